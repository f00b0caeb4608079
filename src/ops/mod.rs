//! Public operations on an [`Attention`](crate::Attention) handle, each
//! composing validation → kernel choice → parameters → launch.

mod forward;

pub use forward::{problem_of, DynTensor, DynTensorMut, ForwardOutput};
