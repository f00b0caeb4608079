//! Public operations on an [`Attention`](crate::Attention) handle, each
//! composing validation → kernel choice → parameters → launch.

mod additive;
mod backward;
mod forward;
pub(crate) mod kvcache;
mod maps;
mod merge;
pub(crate) mod varlen;

pub use additive::AdditiveOutput;
pub use backward::{backward_varlen_workspace_len, backward_workspace_len, BackwardPath, Gradients};
pub use forward::{problem_of, DynTensor, DynTensorMut, ForwardOutput};
pub use kvcache::CacheTables;
pub use maps::MapsRequest;
pub use merge::PartialState;
pub use varlen::SeqLens;

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream, DeviceSlice};

use crate::device::Attention;
use crate::error::Result;
use crate::tensor::{DeviceTensor, DeviceTensorMut, Element, Layout, LseTensorMut};
use crate::validate::{LseDesc, TensorDesc};

/// What validation needs of one tensor argument.
pub(crate) fn desc<T, V: DeviceSlice<T>>(arg: &'static str, view: &V, layout: Layout) -> TensorDesc {
    TensorDesc { arg, layout, len: view.len() }
}

impl Attention {
    /// The shared start of the table-driven operations (packed batches, KV
    /// caches): the stream, Q/K/V/O (named `names`), LSE and the tables
    /// (`tables`: their name and context) must live in this handle's
    /// context; returns the descriptors validation takes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn describe_call<T: Element>(
        &self,
        stream: &CudaStream,
        names: [&'static str; 4],
        q: &DeviceTensor<'_, T>,
        k: &DeviceTensor<'_, T>,
        v: &DeviceTensor<'_, T>,
        o: &DeviceTensorMut<'_, T>,
        lse: Option<&LseTensorMut<'_>>,
        tables: (&'static str, &Arc<CudaContext>),
    ) -> Result<([TensorDesc; 4], Option<LseDesc>)> {
        self.check_context("stream", stream.context())?;
        let views = [
            q.view.stream().context(),
            k.view.stream().context(),
            v.view.stream().context(),
            o.view.stream().context(),
        ];
        for (arg, ctx) in names.into_iter().zip(views).chain([tables]) {
            self.check_context(arg, ctx)?;
        }
        if let Some(l) = lse {
            self.check_context("lse", l.view.stream().context())?;
        }
        let descs = [
            desc(names[0], &q.view, q.layout),
            desc(names[1], &k.view, k.layout),
            desc(names[2], &v.view, v.layout),
            desc(names[3], &o.view, o.layout),
        ];
        Ok((descs, lse.map(|l| LseDesc { layout: l.layout, len: l.view.len() })))
    }
}
