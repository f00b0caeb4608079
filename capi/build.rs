//! Passes the target triple to tests/c_abi.rs, which asks the `cc` crate for
//! the C compiler at test time (cc needs the triple, which cargo gives only
//! to build scripts). Nothing is compiled here.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=FUSED_ATTN_CAPI_TARGET={target}");
}
