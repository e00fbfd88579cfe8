//! Device memory: allocations and their addresses ([`Dev`]), the plan's weights
//! ([`DevWeight`]) and buffers ([`DevBuffer`]) on the device, and what a run does with
//! them: sizing the per-call buffers, uploading the inputs, poisoning activations with
//! NaN, copying the logits back.

use std::sync::Arc;

use cudarc::driver::{
    result as cu_result, sys as cu, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError,
    ValidAsZeroBits,
};
use ngpt_schemas::plan as pb;

use super::errors::{drv, plan_cuda_err, step_err};
use super::executor::{program_name, CudaExecutor};
use crate::cpu::ProgramKind;
use crate::error::Result;
use crate::plan::{LoadedPlan, QuantBits, WeightData};
use crate::rows::Rows;

/// A quiet NaN: what every activation and output element holds before a run writes it.
pub(super) const POISON: u32 = 0x7fc0_0000;

/// A device allocation and its address.
pub(super) struct Dev<T> {
    pub(super) slice: CudaSlice<T>,
    pub(super) ptr: u64,
}

impl<T: DeviceRepr + ValidAsZeroBits> Dev<T> {
    /// `len` zeroed elements (at least one: the driver refuses empty allocations).
    pub(super) fn zeros(stream: &Arc<CudaStream>, len: usize, what: &str) -> Result<Dev<T>> {
        let slice = stream.alloc_zeros::<T>(len.max(1)).map_err(|e| {
            plan_cuda_err(format!(
                "cannot allocate {what} ({} bytes): {}",
                len.saturating_mul(std::mem::size_of::<T>()),
                drv(e)
            ))
        })?;
        Ok(Self::wrap(slice, stream))
    }

    pub(super) fn upload(stream: &Arc<CudaStream>, data: &[T], what: &str) -> Result<Dev<T>> {
        if data.is_empty() {
            return Self::zeros(stream, 0, what);
        }
        let slice = stream.clone_htod(data).map_err(|e| {
            plan_cuda_err(format!(
                "cannot upload {what} ({} bytes): {}",
                std::mem::size_of_val(data),
                drv(e)
            ))
        })?;
        Ok(Self::wrap(slice, stream))
    }

    pub(super) fn wrap(slice: CudaSlice<T>, stream: &Arc<CudaStream>) -> Dev<T> {
        // Event tracking is off for this context, so the guard records nothing.
        let ptr = {
            let (ptr, _guard) = slice.device_ptr(stream);
            ptr
        };
        Dev { slice, ptr }
    }

    pub(super) fn len(&self) -> usize {
        self.slice.len()
    }
}

/// Makes `slot` hold at least `len` zeroed-when-new elements, freeing the old allocation
/// first (so peak memory stays the new size); returns whether it moved (a captured graph
/// holds its address).
pub(super) fn grow<T: DeviceRepr + ValidAsZeroBits>(
    slot: &mut Option<Dev<T>>,
    len: usize,
    stream: &Arc<CudaStream>,
    what: &str,
) -> Result<bool> {
    if slot.as_ref().map_or(0, Dev::len) >= len {
        return Ok(false);
    }
    *slot = None;
    *slot = Some(Dev::zeros(stream, len, what)?);
    Ok(true)
}

/// A weight on the device.
pub(super) struct DevWeight {
    /// Elements (the product of its shape).
    pub(super) elems: usize,
    /// As the plan stores it: f32, or bf16 bits.
    pub(super) f32: Option<Dev<f32>>,
    pub(super) bf16: Option<Dev<u16>>,
    /// An I8 or I4 matrix: its integers and block scales, as stored.
    pub(super) quant: Option<DevQuant>,
}

/// A weight-only quantized `[rows, k]` matrix on the device (plan.rs `QuantWeight`): the
/// integers and the f16 block scales uploaded as `model.weights` stores them (the gemv
/// kernels and `dequant_rows` read those bytes; no float copy is kept).
pub(super) struct DevQuant {
    pub(super) bits: QuantBits,
    pub(super) rows: usize,
    pub(super) k: usize,
    /// log2 of the block (a power of two, at least 16, checked at load).
    pub(super) block_log2: u32,
    /// Bytes of one row of integers (k for I8, ceil(k / 2) for I4).
    pub(super) row_bytes: usize,
    pub(super) data: Dev<u8>,
    /// The scales' f16 bits, ceil(k / block) a row.
    pub(super) scales: Dev<u16>,
}

impl DevQuant {
    /// 8 or 4.
    pub(super) fn bits(&self) -> u32 {
        match self.bits {
            QuantBits::Int8 => 8,
            QuantBits::Int4 => 4,
        }
    }
}

impl DevWeight {
    /// The f32 form kernels read (F32 weights, or the f32 copy of a BF16 one).
    pub(super) fn f32_ptr(&self) -> Option<u64> {
        self.f32.as_ref().map(|d| d.ptr)
    }
}

/// A plan buffer on the device.
pub(super) enum Mem {
    F32(Dev<f32>),
    I32(Dev<i32>),
}

pub(super) struct DevBuffer {
    pub(super) name: String,
    pub(super) int32: bool,
    pub(super) cache: bool,
    /// Filled with NaN before each run (activations and outputs).
    pub(super) poison: bool,
    pub(super) mem: Option<Mem>,
    /// Elements this call needs (the plan's affine size); bounds are checked against it,
    /// as the CPU executor sizes its buffers to exactly this.
    pub(super) need: usize,
}

impl DevBuffer {
    pub(super) fn capacity(&self) -> usize {
        match &self.mem {
            Some(Mem::F32(d)) => d.len(),
            Some(Mem::I32(d)) => d.len(),
            None => 0,
        }
    }
    pub(super) fn ptr(&self) -> u64 {
        match &self.mem {
            Some(Mem::F32(d)) => d.ptr,
            Some(Mem::I32(d)) => d.ptr,
            None => 0,
        }
    }
}

/// The plan's weights on the device, in the plan's order.
pub(super) fn upload_weights(
    plan: &LoadedPlan,
    stream: &Arc<CudaStream>,
    widen_bf16: bool,
) -> Result<Vec<DevWeight>> {
    let f32_reads = plan.f32_weight_reads();
    let mut weights = Vec::with_capacity(plan.weights.len());
    for (i, (w, values)) in plan.plan.weights.iter().zip(&plan.weights).enumerate() {
        let what = format!("weight `{}`", w.name);
        let dw = match values {
            WeightData::Bf16(bits) => {
                let f32_copy = if widen_bf16 || f32_reads.contains(&i) {
                    Some(Dev::upload(stream, &values.to_f32(), &what)?)
                } else {
                    None
                };
                DevWeight {
                    elems: bits.len(),
                    f32: f32_copy,
                    bf16: Some(Dev::upload(stream, bits, &what)?),
                    quant: None,
                }
            }
            WeightData::F32(v) => DevWeight {
                elems: v.len(),
                f32: Some(Dev::upload(stream, v, &what)?),
                bf16: None,
                quant: None,
            },
            // Block scales: uploaded with the matrix they scale (below), read only
            // through it (plan validation).
            WeightData::F16(v) => DevWeight {
                elems: v.len(),
                f32: None,
                bf16: None,
                quant: None,
            },
            WeightData::Quant(q) => {
                let block_log2 = quant_block_log2(q.block).ok_or_else(|| crate::Error::Plan {
                    path: what.clone(),
                    problem: format!("block {} is not a power of two of at least 16", q.block),
                })?;
                DevWeight {
                    elems: q.rows * q.k,
                    f32: None,
                    bf16: None,
                    quant: Some(DevQuant {
                        bits: q.bits,
                        rows: q.rows,
                        k: q.k,
                        block_log2,
                        row_bytes: q.row_bytes(),
                        data: Dev::upload(stream, &q.data, &what)?,
                        scales: Dev::upload(stream, &q.scales, &format!("{what}'s scales"))?,
                    }),
                }
            }
        };
        weights.push(dw);
    }
    Ok(weights)
}

/// log2 of a quantized weight's block: a power of two of at least 16 (what the kernels'
/// runs of 16 weights need), at most 2^30.
pub(super) fn quant_block_log2(block: usize) -> Option<u32> {
    (block >= 16 && block.is_power_of_two() && block <= 1 << 30).then(|| block.trailing_zeros())
}

/// The plan's buffers: the KV caches allocated (for `batch` sequences), the rest per call.
pub(super) fn plan_buffers(
    plan: &LoadedPlan,
    stream: &Arc<CudaStream>,
    batch: usize,
) -> Result<Vec<DevBuffer>> {
    let mut buffers = Vec::with_capacity(plan.plan.buffers.len());
    for (i, b) in plan.plan.buffers.iter().enumerate() {
        let cache = b.kind == pb::BufferKind::Cache as i32;
        let int32 = b.dtype == pb::DType::I32 as i32;
        let mut buf = DevBuffer {
            name: b.name.clone(),
            int32,
            cache,
            poison: !int32
                && (b.kind == pb::BufferKind::Activation as i32
                    || b.kind == pb::BufferKind::Output as i32),
            mem: None,
            need: 0,
        };
        if cache {
            let n = plan.buffer_len(i, 0, batch)?;
            let what = format!("buffer `{}` (batch {batch})", b.name);
            buf.mem = Some(if int32 {
                Mem::I32(Dev::zeros(stream, n, &what)?)
            } else {
                Mem::F32(Dev::zeros(stream, n, &what)?)
            });
            buf.need = n;
        }
        buffers.push(buf);
    }
    Ok(buffers)
}

impl CudaExecutor {
    /// Grows every per-call buffer to what `rows` rows need (zeroed when new).
    pub(super) fn size_buffers(&mut self, rows: usize) -> Result<()> {
        let st = &mut *self.state;
        for i in 0..st.buffers.len() {
            if st.buffers[i].cache {
                continue;
            }
            let need = st.plan.buffer_len(i, rows, st.batch)?;
            let buf = &mut st.buffers[i];
            if need > buf.capacity() || buf.mem.is_none() {
                let what = format!("buffer `{}` for {rows} rows", buf.name);
                // The old allocation goes first, so peak memory stays the new size.
                buf.mem = None;
                buf.mem = Some(if buf.int32 {
                    Mem::I32(Dev::zeros(&st.stream, need, &what)?)
                } else {
                    Mem::F32(Dev::zeros(&st.stream, need, &what)?)
                });
                st.generation += 1;
            }
            buf.need = need;
        }
        Ok(())
    }

    /// Copies a call's tokens, positions and slots into their buffers (which stay where
    /// they are between calls of one shape: a decode graph reads them there).
    pub(super) fn upload_inputs(&mut self, rows: &Rows<'_>) -> Result<()> {
        for (bi, src) in [
            (self.tokens_buf, rows.tokens),
            (self.positions_buf, rows.positions),
            (self.slots_buf, rows.slots),
        ] {
            let buf = &self.buffers[bi];
            if !buf.int32 || buf.need < src.len() || buf.capacity() < src.len() {
                return Err(step_err(
                    "inputs",
                    "the tokens/positions/slots buffers are not int32 [rows]",
                ));
            }
            // SAFETY: the destination holds at least src.len() i32 (checked above); the
            // copy from pageable memory is staged before this call returns.
            unsafe { cu_result::memcpy_htod_async(buf.ptr(), src, self.stream.cu_stream()) }
                .map_err(|e| step_err("inputs", format!("cuMemcpyHtoDAsync: {}", drv(e))))?;
        }
        Ok(())
    }

    /// NaN into every activation and output element this call uses.
    pub(super) fn poison(&self) -> std::result::Result<(), DriverError> {
        for b in &self.buffers {
            if b.poison && b.need > 0 && b.mem.is_some() {
                // SAFETY: need <= capacity elements of 4 bytes at ptr.
                unsafe {
                    cu::cuMemsetD32Async(b.ptr(), POISON, b.need, self.stream.cu_stream())
                        .result()?
                };
            }
        }
        Ok(())
    }

    /// Copies the logits back (all `rows`, or only `fetch`'s, in its order), synchronizing
    /// the stream, and checks them in check mode.
    pub(super) fn fetch_logits(
        &mut self,
        rows: usize,
        kind: ProgramKind,
        fetch: Option<&[usize]>,
    ) -> Result<()> {
        let v = self.plan.dims.vocab;
        let want = rows * v;
        let st = &mut *self.state;
        let buf = &st.buffers[st.logits_buf];
        if buf.int32 {
            return Err(step_err("logits", "logits buffer is not f32"));
        }
        if buf.need < want || buf.capacity() < want {
            return Err(step_err(
                "logits",
                format!(
                    "the logits buffer holds {} elements, {rows} rows x vocab {v} need {want}",
                    buf.need
                ),
            ));
        }
        let what = program_name(kind);
        let stream = st.stream.cu_stream();
        let copy_err = |e| step_err(what, format!("copying the logits back: {}", drv(e)));
        match fetch {
            None => {
                st.host_logits.resize(want, 0.0);
                // SAFETY: want <= capacity f32 elements at ptr; the stream is synchronized
                // below before the host reads them.
                unsafe { cu_result::memcpy_dtoh_async(&mut st.host_logits, buf.ptr(), stream) }
                    .map_err(copy_err)?;
            }
            Some(sel) => {
                st.host_logits.resize(sel.len() * v, 0.0);
                for (dst, &r) in st.host_logits.chunks_exact_mut(v).zip(sel) {
                    // SAFETY: r < rows (checked in run_program), so row r's v elements lie
                    // within the want <= capacity f32 elements at ptr; synchronized below.
                    let src = buf.ptr() + (r * v * std::mem::size_of::<f32>()) as u64;
                    unsafe { cu_result::memcpy_dtoh_async(dst, src, stream) }.map_err(copy_err)?;
                }
            }
        }
        self.sync(what)?;
        if self.check {
            if let Some(i) = self.host_logits.iter().position(|x| x.is_nan()) {
                return Err(step_err(
                    what,
                    format!(
                        "logits row {} column {} is NaN: no step wrote it (outputs are poisoned with NaN before each run)",
                        i / v,
                        i % v
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::quant_block_log2;

    #[test]
    fn blocks_are_powers_of_two_of_at_least_16() {
        assert_eq!(quant_block_log2(16), Some(4));
        assert_eq!(quant_block_log2(32), Some(5));
        assert_eq!(quant_block_log2(1 << 20), Some(20));
        for bad in [0, 8, 24, 48, 1 << 31] {
            assert_eq!(quant_block_log2(bad), None, "{bad}");
        }
    }
}
