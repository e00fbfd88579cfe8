//! Resolving a plan's steps for one request: each step becomes an [`Op`] with device
//! addresses and launch shapes, checked against its kernel's contract
//! (`crate::contract`) or the GEMM's extents; narrow weight GEMMs become `gemv_*` launches
//! here (`gemv_i8_*` / `gemv_i4_*` for a weight-only quantized weight), the rest cuBLAS
//! GEMMs (run by gemm.rs; a quantized weight is dequantized to f32 a tile of rows at a time
//! first).

use ngpt_schemas::plan::{self as pb, arg, operand, step};

use super::device::{DevQuant, DevWeight};
use super::errors::step_err;
use super::executor::CudaExecutor;
use crate::contract::{self, Bound, Slot};
use crate::cpu::ProgramKind;
use crate::error::Result;
use crate::plan::eval;

/// The widest GEMM (columns, i.e. activation rows) that runs as a `gemv_*` kernel.
pub(super) const GEMV_MAX_N: usize = 8;

/// Output rows per block of a `gemv_*` kernel (one warp each).
pub(super) const GEMV_ROWS_PER_BLOCK: u32 = 8;

/// The gemv kernel families, in the order of `State::gemv`'s rows (entry `gemv_<name>_N`).
pub(super) const GEMV_FAMILIES: [&str; 4] = ["bf16", "f32", "i8", "i4"];

/// Most floats a quantized weight's dequantized tile takes (32 MiB): the prefill GEMM over
/// a quantized weight runs as `dequant_rows` into a scratch slot of this size and
/// `cublasSgemm`, tile after tile of rows.
pub(super) const DEQUANT_TILE_FLOATS: usize = 8 << 20;

/// Rows of a `k`-wide quantized weight that one dequantized tile holds (of `m` rows
/// multiplied).
pub(super) fn dequant_tile_rows(m: usize, k: usize) -> usize {
    (DEQUANT_TILE_FLOATS / k.max(1)).clamp(1, m.max(1))
}

/// Whether a quantized gemv takes the 16-byte loads: whole 16-byte runs of integers in
/// every row (k a multiple of 16 for I8, of 32 for I4, so that each row starts aligned),
/// and 16-byte aligned activations with ldb a multiple of 4 floats.
pub(super) fn quant_vec(bits: u32, k: usize, b_ptr: u64, ldb: usize) -> bool {
    let per_load = if bits == 8 { 16 } else { 32 };
    k.is_multiple_of(per_load) && b_ptr.is_multiple_of(16) && ldb.is_multiple_of(4)
}

/// The `flags` argument of `gemv_i*`: bit 0 `vec`, bits 8 and up log2(block).
pub(super) fn quant_flags(vec: bool, block_log2: u32) -> i32 {
    i32::from(vec) | ((block_log2 as i32) << 8)
}

/// A kernel parameter, by value.
#[derive(Debug, Clone, Copy)]
pub(super) enum Param {
    Ptr(u64),
    I32(i32),
    F32(f32),
}

/// A GEMM operand as cuBLAS will read it.
#[derive(Debug, Clone, Copy)]
pub(super) enum GemmIn {
    F32(u64),
    Bf16(u64),
    /// An f32 operand of a bf16 GEMM: `n` elements from `src`, rounded into scratch slot
    /// `slot` first.
    ToBf16 {
        src: u64,
        n: usize,
        slot: usize,
    },
    /// A weight-only quantized `a` in the weight form (op(A) = A^T, lda = k): dequantized
    /// to f32, `tile_rows` rows at a time, into the dequantization scratch, each tile then
    /// multiplied by `cublasSgemm`.
    Dequant {
        data: u64,
        scales: u64,
        bits: u32,
        row_bytes: usize,
        block_log2: u32,
        tile_rows: usize,
    },
}

/// One step, resolved to device addresses and checked.
#[derive(Debug, Clone)]
pub(super) enum Op {
    Launch {
        step: usize,
        func: usize,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared: u32,
        params: Vec<Param>,
    },
    Gemm {
        step: usize,
        trans_a: bool,
        trans_b: bool,
        mnk: (i32, i32, i32),
        ld: (i32, i32, i32),
        alpha: f32,
        beta: f32,
        a: GemmIn,
        b: GemmIn,
        c: u64,
    },
    /// A GEMM with m or n zero: nothing to compute (the CPU executor skips it too).
    Nothing,
    /// The whole decode program as one `decode_persistent` launch over `n_ops` table
    /// entries (the steps it replaced are in the table, in order).
    Persistent { n_ops: usize },
}

impl CudaExecutor {
    pub(super) fn program(&self, kind: ProgramKind) -> Result<&pb::Program> {
        match kind {
            ProgramKind::Prefill => self.plan.plan.prefill.as_ref(),
            ProgramKind::Decode => self.plan.plan.decode.as_ref(),
        }
        .ok_or_else(|| step_err("program", "missing"))
    }

    /// Resolves every step of `kind` for `rows` rows to device addresses, checking each
    /// against its kernel's contract or the GEMM's extents.
    pub(super) fn resolve(&self, kind: ProgramKind, rows: usize) -> Result<Vec<Op>> {
        let program = self.program(kind)?;
        let mut ops = Vec::with_capacity(program.steps.len());
        for (si, s) in program.steps.iter().enumerate() {
            let op = match s.kind.as_ref() {
                Some(step::Kind::Launch(l)) => self.resolve_launch(si, &s.name, l, rows)?,
                Some(step::Kind::Gemm(g)) => self.resolve_gemm(si, &s.name, g, rows)?,
                None => return Err(step_err(&s.name, "empty step")),
            };
            ops.push(op);
        }
        Ok(ops)
    }

    pub(super) fn resolve_launch(
        &self,
        si: usize,
        name: &str,
        l: &pb::Launch,
        rows: usize,
    ) -> Result<Op> {
        let plan = &self.plan;
        let d = plan.dims;
        let entry = contract::entry(&l.entry)
            .ok_or_else(|| step_err(name, format!("unknown kernel entry `{}`", l.entry)))?;
        if entry.args.len() != l.args.len() {
            return Err(step_err(
                name,
                "argument count differs from the kernel contract",
            ));
        }
        let func = *self
            .function_of
            .get(&(l.module, l.entry.clone()))
            .ok_or_else(|| step_err(name, format!("kernel `{}` is not loaded", l.entry)))?;
        // Arguments: device addresses and symbol values, and what each is bound to for the
        // contract check.
        let mut params = Vec::with_capacity(l.args.len());
        let mut bound = Vec::with_capacity(l.args.len());
        for (i, (spec, a)) in entry.args.iter().zip(&l.args).enumerate() {
            match (spec.slot, a.value.as_ref()) {
                (Slot::In | Slot::Out, Some(arg::Value::Buffer(b))) => {
                    let b = *b as usize;
                    let buf = self
                        .buffers
                        .get(b)
                        .ok_or_else(|| step_err(name, format!("buffer {b} does not exist")))?;
                    bound.push(Bound::Buffer {
                        index: b,
                        name: &buf.name,
                        int32: buf.int32,
                        len: buf.need.min(buf.capacity()),
                    });
                    params.push(Param::Ptr(buf.ptr()));
                }
                (Slot::Weight, Some(arg::Value::Weight(w))) => {
                    let dw = self.weights.get(*w as usize);
                    let ptr = dw.and_then(DevWeight::f32_ptr).ok_or_else(|| {
                        step_err(name, format!("weight {w} has no f32 form on the device"))
                    })?;
                    bound.push(Bound::Weight {
                        index: *w as usize,
                        len: dw.map_or(0, |dw| dw.elems),
                    });
                    params.push(Param::Ptr(ptr));
                }
                (Slot::Symbol, Some(arg::Value::Symbol(s))) => {
                    let v = match pb::Symbol::try_from(*s) {
                        Ok(pb::Symbol::Rows) => rows,
                        Ok(pb::Symbol::Batch) => self.batch,
                        _ => return Err(step_err(name, format!("bad symbol {s}"))),
                    };
                    let v32 = i32::try_from(v)
                        .map_err(|_| step_err(name, format!("{v} exceeds the int range")))?;
                    bound.push(Bound::Int(v as i64));
                    params.push(Param::I32(v32));
                }
                _ => {
                    return Err(step_err(
                        name,
                        format!("argument {i} does not fit its slot"),
                    ))
                }
            }
        }
        let grid = dim3(l.grid.as_ref(), rows, self.batch)
            .ok_or_else(|| step_err(name, "grid is missing or overflows"))?;
        let block = dim3(l.block.as_ref(), rows, self.batch)
            .ok_or_else(|| step_err(name, "block is missing or overflows"))?;
        // The kernel contract: what each entry reads and writes for these arguments, and
        // the launch shapes its kernel takes.
        entry
            .check_grid(&d, grid)
            .and_then(|()| entry.check_block(&d, plan.module_dims.kv_tile, block, l.shared_bytes))
            .and_then(|()| entry.check_args(&d, &bound, self.batch))
            .map_err(|p| step_err(name, p))?;
        // The tensor-core prefill attention takes the same launch (its tiles are static
        // shared memory, so the dynamic part is dropped) and the KV capacity after the
        // plan's arguments.
        if let (true, Some(mma), "attention_prefill", (128, 1, 1)) = (
            self.use_prefill_mma,
            self.prefill_mma,
            l.entry.as_str(),
            block,
        ) {
            let mut params = params;
            params
                .push(Param::I32(i32::try_from(d.max_seq_len).map_err(|_| {
                    step_err(name, "max_seq_len exceeds the int range")
                })?));
            return Ok(Op::Launch {
                step: si,
                func: mma,
                grid,
                block,
                shared: 0,
                params,
            });
        }
        Ok(Op::Launch {
            step: si,
            func,
            grid,
            block,
            shared: l.shared_bytes,
            params,
        })
    }

    pub(super) fn resolve_gemm(
        &self,
        si: usize,
        name: &str,
        g: &pb::Gemm,
        rows: usize,
    ) -> Result<Op> {
        let ext = crate::plan::gemm_extents(g, rows, self.batch).map_err(|p| step_err(name, p))?;
        let src = |o: Option<&pb::Operand>| o.and_then(|o| o.source);
        let ci = match src(g.c.as_ref()) {
            Some(operand::Source::Buffer(b)) => b as usize,
            _ => return Err(step_err(name, "GEMM c must be a buffer")),
        };
        let cbuf = self
            .buffers
            .get(ci)
            .filter(|b| !b.int32)
            .ok_or_else(|| step_err(name, "GEMM c must be f32"))?;
        if let Some(operand::Source::Weight(w)) = src(g.a.as_ref()) {
            if let Some(q) = self
                .weights
                .get(w as usize)
                .and_then(|dw| dw.quant.as_ref())
            {
                return self.resolve_quant_gemm(si, name, g, q, &ext, ci);
            }
        }
        let crate::plan::GemmExtents {
            m,
            n,
            k,
            lda,
            ldb,
            ldc,
            need_a,
            need_b,
            need_c,
        } = ext;
        // (address, elements, bf16?)
        let operand = |s: Option<operand::Source>, what: &str| -> Result<(u64, usize, bool)> {
            let bad = || {
                step_err(
                    name,
                    format!("GEMM {what} is not an f32 buffer or weight distinct from c"),
                )
            };
            match s {
                Some(operand::Source::Weight(w)) => {
                    let dw = self.weights.get(w as usize).ok_or_else(bad)?;
                    if dw.quant.is_some() {
                        return Err(step_err(
                            name,
                            format!("GEMM {what} is a quantized weight, which only a, in the weight form, may be"),
                        ));
                    }
                    match (&dw.bf16, &dw.f32) {
                        (Some(_), Some(f)) if self.widen_bf16 => Ok((f.ptr, dw.elems, false)),
                        (Some(b16), _) => Ok((b16.ptr, dw.elems, true)),
                        (None, Some(f)) => Ok((f.ptr, dw.elems, false)),
                        (None, None) => Err(bad()),
                    }
                }
                Some(operand::Source::Buffer(b)) if b as usize != ci => {
                    let buf = self.buffers.get(b as usize).filter(|x| !x.int32);
                    let buf = buf.ok_or_else(bad)?;
                    Ok((buf.ptr(), buf.need, false))
                }
                _ => Err(bad()),
            }
        };
        let (pa, la, a16) = operand(src(g.a.as_ref()), "a")?;
        let (pb_, lb, b16) = operand(src(g.b.as_ref()), "b")?;
        if la < need_a || lb < need_b || cbuf.need < need_c {
            return Err(step_err(
                name,
                format!(
                    "GEMM operands too small: a {la}/{need_a}, b {lb}/{need_b}, c {}/{need_c} elements",
                    cbuf.need
                ),
            ));
        }
        if m == 0 || n == 0 {
            return Ok(Op::Nothing);
        }
        let int = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| {
                step_err(
                    name,
                    format!("GEMM {what} = {v} exceeds cuBLAS's int range"),
                )
            })
        };
        let (m32, n32, k32) = (int(m, "m")?, int(n, "n")?, int(k, "k")?);
        let (lda32, ldb32, ldc32) = (int(lda, "lda")?, int(ldb, "ldb")?, int(ldc, "ldc")?);
        if self.use_gemv && g.trans_a && !g.trans_b && !b16 && n <= GEMV_MAX_N {
            // The weight form: row i of op(A) is A[i * lda ..][..k], column j of B is
            // B[j * ldb ..][..k]; 16-byte loads where both line up.
            let esize = if a16 { 2 } else { 4 };
            let vec = pa % 16 == 0
                && (lda * esize) % 16 == 0
                && k % 8 == 0
                && pb_ % 16 == 0
                && ldb % 4 == 0;
            let blocks = u32::try_from(m.div_ceil(GEMV_ROWS_PER_BLOCK as usize))
                .map_err(|_| step_err(name, format!("GEMM m = {m} is too large")))?;
            return Ok(Op::Launch {
                step: si,
                func: self.gemv[usize::from(!a16)][n - 1],
                grid: (blocks, 1, 1),
                block: (32 * GEMV_ROWS_PER_BLOCK, 1, 1),
                shared: 0,
                params: vec![
                    Param::Ptr(pa),
                    Param::Ptr(pb_),
                    Param::Ptr(cbuf.ptr()),
                    Param::I32(m32),
                    Param::I32(k32),
                    Param::I32(lda32),
                    Param::I32(ldb32),
                    Param::I32(ldc32),
                    Param::F32(g.alpha),
                    Param::F32(g.beta),
                    Param::I32(i32::from(vec)),
                ],
            });
        }
        let bf16 = a16 || b16;
        let input = |p: u64, is16: bool, n_el: usize, slot: usize| {
            if is16 {
                GemmIn::Bf16(p)
            } else if bf16 {
                GemmIn::ToBf16 {
                    src: p,
                    n: n_el,
                    slot,
                }
            } else {
                GemmIn::F32(p)
            }
        };
        Ok(Op::Gemm {
            step: si,
            trans_a: g.trans_a,
            trans_b: g.trans_b,
            mnk: (m32, n32, k32),
            ld: (lda32, ldb32, ldc32),
            alpha: g.alpha,
            beta: g.beta,
            a: input(pa, a16, need_a, 0),
            b: input(pb_, b16, need_b, 1),
            c: cbuf.ptr(),
        })
    }
}

impl CudaExecutor {
    /// A GEMM whose `a` is a weight-only quantized weight: checked as plan validation
    /// states it (the weight form over whole rows: trans_a, not trans_b, k and lda the
    /// weight's K, m at most its rows; b an f32 buffer other than c), then a `gemv_i8_N` /
    /// `gemv_i4_N` launch for at most [`GEMV_MAX_N`] columns (unless `gemv=off`), else
    /// the tiled dequantize-then-Sgemm GEMM.
    fn resolve_quant_gemm(
        &self,
        si: usize,
        name: &str,
        g: &pb::Gemm,
        q: &DevQuant,
        e: &crate::plan::GemmExtents,
        ci: usize,
    ) -> Result<Op> {
        let cbuf = &self.buffers[ci];
        if !g.trans_a || g.trans_b || e.k != q.k || e.lda != q.k || e.m > q.rows {
            return Err(step_err(
                name,
                format!(
                    "a GEMM over a quantized [{}, {}] weight must read whole rows in the weight form (trans_a, not trans_b, k = lda = {}, m <= {}); found trans_a {} trans_b {}, m {} k {} lda {}",
                    q.rows, q.k, q.k, q.rows, g.trans_a, g.trans_b, e.m, e.k, e.lda
                ),
            ));
        }
        let b = match g.b.as_ref().and_then(|o| o.source) {
            Some(operand::Source::Buffer(b)) if b as usize != ci => self
                .buffers
                .get(b as usize)
                .filter(|x| !x.int32)
                .ok_or_else(|| step_err(name, "GEMM b is not an f32 buffer"))?,
            _ => {
                return Err(step_err(
                    name,
                    "GEMM b must be an f32 buffer distinct from c when a is quantized",
                ))
            }
        };
        if b.need < e.need_b || cbuf.need < e.need_c {
            return Err(step_err(
                name,
                format!(
                    "GEMM operands too small: b {}/{}, c {}/{} elements",
                    b.need, e.need_b, cbuf.need, e.need_c
                ),
            ));
        }
        if e.m == 0 || e.n == 0 {
            return Ok(Op::Nothing);
        }
        let int = |v: usize, what: &str| {
            i32::try_from(v)
                .map_err(|_| step_err(name, format!("GEMM {what} = {v} exceeds the int range")))
        };
        let (m32, n32, k32) = (int(e.m, "m")?, int(e.n, "n")?, int(e.k, "k")?);
        let (ldb32, ldc32) = (int(e.ldb, "ldb")?, int(e.ldc, "ldc")?);
        let row_bytes = int(q.row_bytes, "the row bytes")?;
        if self.use_gemv && e.n <= GEMV_MAX_N {
            let vec = quant_vec(q.bits(), q.k, b.ptr(), e.ldb);
            let blocks = u32::try_from(e.m.div_ceil(GEMV_ROWS_PER_BLOCK as usize))
                .map_err(|_| step_err(name, format!("GEMM m = {} is too large", e.m)))?;
            let family = if q.bits() == 8 { 2 } else { 3 };
            return Ok(Op::Launch {
                step: si,
                func: self.gemv[family][e.n - 1],
                grid: (blocks, 1, 1),
                block: (32 * GEMV_ROWS_PER_BLOCK, 1, 1),
                shared: 0,
                params: vec![
                    Param::Ptr(q.data.ptr),
                    Param::Ptr(b.ptr()),
                    Param::Ptr(cbuf.ptr()),
                    Param::I32(m32),
                    Param::I32(k32),
                    Param::I32(row_bytes),
                    Param::I32(ldb32),
                    Param::I32(ldc32),
                    Param::F32(g.alpha),
                    Param::F32(g.beta),
                    Param::I32(quant_flags(vec, q.block_log2)),
                    Param::Ptr(q.scales.ptr),
                ],
            });
        }
        Ok(Op::Gemm {
            step: si,
            trans_a: true,
            trans_b: false,
            mnk: (m32, n32, k32),
            ld: (k32, ldb32, ldc32),
            alpha: g.alpha,
            beta: g.beta,
            a: GemmIn::Dequant {
                data: q.data.ptr,
                scales: q.scales.ptr,
                bits: q.bits(),
                row_bytes: q.row_bytes,
                block_log2: q.block_log2,
                tile_rows: dequant_tile_rows(e.m, e.k),
            },
            b: GemmIn::F32(b.ptr()),
            c: cbuf.ptr(),
        })
    }
}

/// A launch dimension evaluated for this request, if every component fits u32.
fn dim3(d: Option<&pb::Dim3>, rows: usize, batch: usize) -> Option<(u32, u32, u32)> {
    let d = d?;
    let one = |a: Option<&pb::Affine>| -> Option<u32> {
        match a {
            None => Some(1),
            Some(_) => u32::try_from(eval(a, rows, batch)?).ok(),
        }
    };
    d.x.as_ref()?;
    Some((one(d.x.as_ref())?, one(d.y.as_ref())?, one(d.z.as_ref())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_gemvs_take_16_byte_loads_only_over_whole_aligned_runs() {
        // int8: 16 weights a load; int4: 32. The 0.5b's K (1024, 4096) take them.
        assert!(quant_vec(8, 1024, 0x1000, 1024) && quant_vec(4, 4096, 0x1000, 4096));
        assert!(quant_vec(8, 48, 0x1000, 48) && !quant_vec(4, 48, 0x1000, 48));
        // K odd or not a whole run (row starts would not be 16-byte aligned), activations
        // misaligned or ldb not a multiple of 4 floats: the element-wise path.
        for (bits, k, b, ldb) in [
            (4, 45, 0x1000, 48),
            (8, 36, 0x1000, 36),
            (8, 64, 0x1004, 64),
            (4, 64, 0x1000, 66),
        ] {
            assert!(!quant_vec(bits, k, b, ldb), "{bits} {k} {b:#x} {ldb}");
        }
        // flags: bit 0 vec, log2(block) from bit 8, as helpers.cu reads them.
        assert_eq!(quant_flags(true, 5), 1 | 5 << 8);
        assert_eq!(quant_flags(false, 4), 4 << 8);
    }

    #[test]
    fn dequantized_tiles_hold_at_most_32_mib() {
        // 0.5b lm_head (50,304 x 1,024): 8,192 rows a tile, 7 tiles.
        let rows = dequant_tile_rows(50_304, 1024);
        assert_eq!(rows, 8192);
        assert!(rows * 1024 <= DEQUANT_TILE_FLOATS);
        assert_eq!(50_304usize.div_ceil(rows), 7);
        // A small weight is one tile; a K wider than the tile still gets a row.
        assert_eq!(dequant_tile_rows(97, 64), 97);
        assert_eq!(dequant_tile_rows(10, DEQUANT_TILE_FLOATS * 2), 1);
    }

    #[test]
    fn dims_need_x() {
        let a = |c0| {
            Some(pb::Affine {
                c0,
                c_rows: 0,
                c_batch: 0,
            })
        };
        let d = pb::Dim3 {
            x: Some(pb::Affine {
                c0: 0,
                c_rows: 1,
                c_batch: 0,
            }),
            y: a(4),
            z: None,
        };
        assert_eq!(dim3(Some(&d), 7, 1), Some((7, 4, 1)));
        let no_x = pb::Dim3 {
            x: None,
            y: a(1),
            z: a(1),
        };
        assert_eq!(dim3(Some(&no_x), 7, 1), None);
    }
}
