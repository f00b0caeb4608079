//! Public operations on an [`Attention`](crate::Attention) handle, each
//! composing validation → kernel choice → parameters → launch.

mod forward;
pub(crate) mod kvcache;
pub(crate) mod varlen;

pub use forward::{problem_of, DynTensor, DynTensorMut, ForwardOutput};
pub use kvcache::CacheTables;
pub use varlen::SeqLens;
