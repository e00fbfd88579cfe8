//! The CUDA executor against the CPU executor, on plans made here (the lowering's layout
//! with seeded random weights, so this crate needs no compiler) and on compiled plan
//! directories named by `NGPT_CUDA_TEST_PLANS` (comma-separated; `scripts/gpu-check.sh`
//! passes the tiny and 0.5b presets).
//!
//! Without a usable GPU every GPU test prints `skipped: <why>` and passes; the tests that
//! need no GPU (the helper module compiles with NVRTC, construction fails with one line
//! instead of a panic) run everywhere.
//!
//! Tolerances, relative Frobenius error of the logits against the CPU executor: f32 plans
//! 1e-5; bf16 plans 2e-2 with top-1 agreeing on at least 95% of the rows (the CUDA
//! executor rounds the activation operand of a bf16 GEMM to bf16; the CPU widens the
//! weights instead); weight-only int8 and int4 plans 1e-5, as f32 plans: both executors
//! multiply f32 activations by the same dequantized values f32(scale) * q, exact in f32
//! (the gemv kernels apply the scale to each run of 16 products, the prefill GEMM
//! dequantizes to f32 and runs Sgemm without TF32), so they differ by f32 rounding of
//! sums in another order only, as f32 plans do.

#![cfg(feature = "cuda")]

use std::sync::Arc;

use ngpt_runtime::contract;
use ngpt_runtime::cpu::ProgramKind;
use ngpt_runtime::cuda::{self, CudaExecutor, CudaSession};
use ngpt_runtime::plan::LoadedPlan;
use ngpt_runtime::session::Session;
use ngpt_schemas::plan::{
    self as pb, arg, operand, step, Affine, Arg, Buffer, BufferKind, Dim3, Gemm, KernelModule,
    Launch, Operand, Plan, Program, Step, Symbol,
};
use ngpt_schemas::prost::Message;

type Result<T> = anyhow::Result<T>;

const KV_TILE: usize = 32;

/// The executor options these tests run with: the defaults, with `NGPT_CUDA_OPTIONS`
/// applied (scripts/gpu-check.sh runs them again with the opt-in paths on).
fn options() -> Result<ngpt_runtime::options::CudaOptions> {
    Ok(ngpt_runtime::options::CudaOptions::from_env()?)
}

/// A CUDA executor with [`options`].
fn executor(plan: Arc<LoadedPlan>, batch: usize) -> Result<CudaExecutor> {
    Ok(CudaExecutor::with_options(plan, batch, &options()?)?)
}

/// `Some(reason)` when this process cannot run CUDA; the GPU tests skip with it.
/// Runs `kind` over a rectangle: `per_seq` rows a sequence, slot = sequence.
fn run_rect<'a>(
    ex: &'a mut CudaExecutor,
    kind: ProgramKind,
    tokens: &[i32],
    positions: &[i32],
    per_seq: usize,
) -> ngpt_runtime::Result<&'a [f32]> {
    let slots: Vec<i32> = (0..tokens.len()).map(|r| (r / per_seq) as i32).collect();
    ex.run(
        kind,
        &ngpt_runtime::Rows {
            tokens,
            positions,
            slots: &slots,
        },
    )
}

fn skip() -> Option<String> {
    cuda::unavailable()
}

macro_rules! gpu_or_skip {
    () => {
        if let Some(why) = skip() {
            eprintln!("skipped: {why}");
            return Ok(());
        }
    };
}

// ---------------------------------------------------------------------------------------
// A plan made here: the lowering's buffers and steps, random weights.

#[derive(Clone, Copy)]
struct Shape {
    layers: usize,
    heads: usize,
    embd: usize,
    vocab: usize,
    max_seq: usize,
    bf16: bool,
    /// Weight-only quantized GEMM weights: (bits 8 or 4, block along K).
    quant: Option<(u32, u32)>,
}

const TINY: Shape = Shape {
    layers: 2,
    heads: 4,
    embd: 64,
    vocab: 97,
    max_seq: 64,
    bf16: false,
    quant: None,
};

/// An odd shape: 3 heads of 32 (head_dim not a multiple of 64), a prime vocabulary.
const ODD32: Shape = Shape {
    layers: 3,
    heads: 3,
    embd: 96,
    vocab: 211,
    max_seq: 32,
    bf16: false,
    quant: None,
};

/// Odder: 3 heads of 12, n_embd 36 (rows not a multiple of 8 elements for the gemv's
/// 16-byte loads: the element-wise path), bf16.
const ODD12: Shape = Shape {
    layers: 2,
    heads: 3,
    embd: 36,
    vocab: 97,
    max_seq: 24,
    bf16: true,
    quant: None,
};

/// Deterministic uniform values in [-1, 1).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn aff(c0: u64, c_rows: u64, c_batch: u64) -> Option<Affine> {
    Some(Affine {
        c0,
        c_rows,
        c_batch,
    })
}

struct Builder {
    plan: Plan,
    weights: Vec<u8>,
    rng: Lcg,
}

impl Builder {
    fn weight(&mut self, name: &str, shape: &[u64], scale: f32, offset: f32, bf16: bool) -> u32 {
        let n: u64 = shape.iter().product();
        let pad = (256 - self.weights.len() % 256) % 256;
        self.weights.extend(std::iter::repeat_n(0u8, pad));
        let offset_bytes = self.weights.len() as u64;
        for _ in 0..n {
            let v = offset + scale * self.rng.next();
            if bf16 {
                self.weights.extend(half::bf16::from_f32(v).to_le_bytes());
            } else {
                self.weights.extend(v.to_le_bytes());
            }
        }
        self.plan.weights.push(pb::Weight {
            name: name.into(),
            dtype: if bf16 {
                pb::DType::Bf16
            } else {
                pb::DType::F32
            } as i32,
            shape: shape.to_vec(),
            offset: offset_bytes,
            bytes: self.weights.len() as u64 - offset_bytes,
            quant: None,
        });
        (self.plan.weights.len() - 1) as u32
    }

    /// A GEMM weight `[n, k]` as `s` stores them: quantized (symmetric, per block of K:
    /// scale = max |v| / qmax rounded to f16, q = round(v / scale)), bf16 or f32.
    fn gemm_weight(&mut self, name: &str, shape: [u64; 2], scale: f32, s: Shape) -> u32 {
        let Some((bits, block)) = s.quant else {
            return self.weight(name, &shape, scale, 0.0, s.bf16);
        };
        let (n, k, block) = (shape[0] as usize, shape[1] as usize, block as usize);
        let nb = k.div_ceil(block);
        let qmax = if bits == 8 { 127.0 } else { 7.0 };
        let row_bytes = if bits == 8 { k } else { k.div_ceil(2) };
        let (mut ints, mut scales) = (vec![0u8; n * row_bytes], vec![]);
        for r in 0..n {
            let v: Vec<f32> = (0..k).map(|_| scale * self.rng.next()).collect();
            for (bi, chunk) in v.chunks(block).enumerate() {
                let big = chunk.iter().fold(0f32, |a, x| a.max(x.abs()));
                let sc = half::f16::from_f32((big / qmax).max(1e-4));
                scales.extend(sc.to_le_bytes());
                for (j, x) in chunk.iter().enumerate() {
                    let q = (x / sc.to_f32()).round().clamp(-qmax - 1.0, qmax) as i32;
                    let col = bi * block + j;
                    if bits == 8 {
                        ints[r * row_bytes + col] = q as i8 as u8;
                    } else {
                        ints[r * row_bytes + col / 2] |= (((q + 8) as u8) & 15) << (4 * (col % 2));
                    }
                }
            }
        }
        let push =
            |b: &mut Builder, name: String, dtype: pb::DType, shape: Vec<u64>, bytes: &[u8]| {
                let pad = (256 - b.weights.len() % 256) % 256;
                b.weights.extend(std::iter::repeat_n(0u8, pad));
                let offset = b.weights.len() as u64;
                b.weights.extend_from_slice(bytes);
                b.plan.weights.push(pb::Weight {
                    name,
                    dtype: dtype as i32,
                    shape,
                    offset,
                    bytes: bytes.len() as u64,
                    quant: None,
                });
                (b.plan.weights.len() - 1) as u32
            };
        let si = push(
            self,
            format!("{name}.scales"),
            pb::DType::F16,
            vec![n as u64, nb as u64],
            &scales,
        );
        let dtype = if bits == 8 {
            pb::DType::I8
        } else {
            pb::DType::I4
        };
        let wi = push(self, name.to_string(), dtype, shape.to_vec(), &ints);
        self.plan.weights[wi as usize].quant = Some(pb::Quant {
            block: block as u32,
            scales: si,
            act_block: 0,
        });
        wi
    }

    fn buffer(&mut self, name: &str, dtype: pb::DType, kind: BufferKind, e: Affine) -> u32 {
        if let Some(i) = self.plan.buffers.iter().position(|b| b.name == name) {
            return i as u32;
        }
        self.plan.buffers.push(Buffer {
            name: name.into(),
            dtype: dtype as i32,
            kind: kind as i32,
            elements: Some(e),
        });
        (self.plan.buffers.len() - 1) as u32
    }

    fn rows(&mut self, name: &str, width: usize, kind: BufferKind) -> u32 {
        self.buffer(
            name,
            pb::DType::F32,
            kind,
            Affine {
                c0: 0,
                c_rows: width as u64,
                c_batch: 0,
            },
        )
    }
}

fn buf(i: u32) -> Arg {
    Arg {
        value: Some(arg::Value::Buffer(i)),
    }
}
fn wt(i: u32) -> Arg {
    Arg {
        value: Some(arg::Value::Weight(i)),
    }
}
fn sym(s: Symbol) -> Arg {
    Arg {
        value: Some(arg::Value::Symbol(s as i32)),
    }
}

fn launch(name: &str, entry: &str, heads: u64, block: u64, shared: u32, args: Vec<Arg>) -> Step {
    Step {
        name: name.into(),
        kind: Some(step::Kind::Launch(Launch {
            module: 0,
            entry: entry.into(),
            grid: Some(Dim3 {
                x: aff(0, 1, 0),
                y: aff(heads, 0, 0),
                z: aff(1, 0, 0),
            }),
            block: Some(Dim3 {
                x: aff(block, 0, 0),
                y: aff(1, 0, 0),
                z: aff(1, 0, 0),
            }),
            shared_bytes: shared,
            args,
        })),
    }
}

/// `out[R, n] = x[R, k] . W[n, k]^T`, as the lowering states it for cuBLAS.
fn gemm(name: &str, x: u32, w: u32, n: usize, k: usize, out: u32) -> Step {
    Step {
        name: name.into(),
        kind: Some(step::Kind::Gemm(Gemm {
            trans_a: true,
            trans_b: false,
            m: aff(n as u64, 0, 0),
            n: aff(0, 1, 0),
            k: aff(k as u64, 0, 0),
            lda: k as u64,
            ldb: k as u64,
            ldc: n as u64,
            alpha: 1.0,
            beta: 0.0,
            a: Some(Operand {
                source: Some(operand::Source::Weight(w)),
            }),
            b: Some(Operand {
                source: Some(operand::Source::Buffer(x)),
            }),
            c: Some(Operand {
                source: Some(operand::Source::Buffer(out)),
            }),
        })),
    }
}

/// A plan with the lowering's layout for `s`, its weights seeded by `seed`.
fn made_plan(s: Shape, seed: u64) -> Result<(Vec<u8>, Vec<u8>)> {
    let (c, h) = (s.embd, s.heads);
    let d = c / h;
    let p = d / 2;
    let defines = [
        ("NGPT_C", c),
        ("NGPT_H", h),
        ("NGPT_D", d),
        ("NGPT_V", s.vocab),
        ("NGPT_MAX_SEQ", s.max_seq),
        ("NGPT_KV_TILE", KV_TILE),
    ]
    .map(|(name, value)| pb::Define {
        name: name.into(),
        value: value as i64,
    })
    .to_vec();
    let mut b = Builder {
        plan: Plan {
            format_major: pb::FORMAT_MAJOR,
            format_minor: pb::FORMAT_MINOR,
            producer: "runtime/tests/cuda.rs".into(),
            config: Some(pb::ModelConfig {
                n_layer: s.layers as u32,
                n_head: h as u32,
                n_embd: c as u32,
                head_dim: d as u32,
                vocab_size: s.vocab as u32,
                block_size: s.max_seq as u32,
                base_scale: 1.0 / (c as f64).sqrt(),
                n_inner: 0,
            }),
            weight_dtype: match (s.quant, s.bf16) {
                (Some((8, _)), _) => pb::DType::I8,
                (Some(_), _) => pb::DType::I4,
                (None, true) => pb::DType::Bf16,
                (None, false) => pb::DType::F32,
            } as i32,
            max_seq_len: s.max_seq as u32,
            modules: vec![KernelModule {
                name: contract::MODULE.into(),
                source: String::new(),
                entries: contract::ENTRIES
                    .iter()
                    .map(|e| e.name.to_string())
                    .collect(),
                abi: pb::KERNEL_ABI,
                defines,
            }],
            ..Default::default()
        },
        weights: vec![],
        rng: Lcg(seed),
    };
    let one = Affine {
        c0: 0,
        c_rows: 1,
        c_batch: 0,
    };
    let tokens = b.buffer("tokens", pb::DType::I32, BufferKind::Input, one);
    let positions = b.buffer("positions", pb::DType::I32, BufferKind::Input, one);
    let slots = b.buffer("slots", pb::DType::I32, BufferKind::Input, one);
    let x0 = b.rows("x0", c, BufferKind::Activation);
    let hb = b.rows("h", c, BufferKind::Activation);
    let qkv = b.rows("qkv", 3 * c, BufferKind::Activation);
    let q = b.rows("q", c, BufferKind::Activation);
    let att = b.rows("att", c, BufferKind::Activation);
    let proj = b.rows("proj", c, BufferKind::Activation);
    let fc = b.rows("fc", 8 * c, BufferKind::Activation);
    let act = b.rows("act", 4 * c, BufferKind::Activation);
    let logits = b.rows("logits", s.vocab, BufferKind::Output);
    let gs = 1.0 / (c as f32).sqrt();
    let wte = b.weight("wte", &[s.vocab as u64, c as u64], 1.0, 0.0, false);
    // The position table: cos/sin-like pairs, as the lowering's diagonal form.
    let table = b.weight(
        "position_table",
        &[s.max_seq as u64, d as u64],
        1.0,
        0.0,
        false,
    );
    let mut layers = vec![];
    for i in 0..s.layers {
        let cu = c as u64;
        let kc = b.buffer(
            &format!("h.{i}.k_cache"),
            pb::DType::F32,
            BufferKind::Cache,
            Affine {
                c0: 0,
                c_rows: 0,
                c_batch: (h * s.max_seq * d) as u64,
            },
        );
        let vc = b.buffer(
            &format!("h.{i}.v_cache"),
            pb::DType::F32,
            BufferKind::Cache,
            Affine {
                c0: 0,
                c_rows: 0,
                c_batch: (h * s.max_seq * d) as u64,
            },
        );
        let w_qkv = b.gemm_weight(&format!("h.{i}.qkv"), [3 * cu, cu], gs, s);
        let qs = b.weight(&format!("h.{i}.q_scale"), &[cu], 0.5, 2.0, false);
        let ks = b.weight(&format!("h.{i}.k_scale"), &[cu], 0.5, 2.0, false);
        let w_o = b.gemm_weight(&format!("h.{i}.o"), [cu, cu], gs, s);
        let lr_a = b.weight(&format!("h.{i}.lr_a"), &[cu], 0.1, 0.3, false);
        let w_fc = b.gemm_weight(&format!("h.{i}.fc"), [8 * cu, cu], gs, s);
        let w_mp = b.gemm_weight(&format!("h.{i}.mlp_proj"), [cu, 4 * cu], gs / 2.0, s);
        let lr_m = b.weight(&format!("h.{i}.lr_m"), &[cu], 0.1, 0.3, false);
        layers.push((kc, vc, w_qkv, qs, ks, w_o, lr_a, w_fc, w_mp, lr_m));
    }
    let lm = b.gemm_weight("lm_head", [s.vocab as u64, c as u64], 1.0, s);
    let program = |decode: bool| {
        let mut steps = vec![
            launch(
                "embed",
                "embed",
                1,
                256,
                0,
                vec![buf(tokens), wt(wte), buf(x0), sym(Symbol::Rows)],
            ),
            launch(
                "norm",
                "norm_rows",
                1,
                256,
                0,
                vec![buf(x0), buf(hb), sym(Symbol::Rows)],
            ),
        ];
        for (i, &(kc, vc, w_qkv, qs, ks, w_o, lr_a, w_fc, w_mp, lr_m)) in layers.iter().enumerate()
        {
            let n = |s: &str| format!("h.{i}.{s}");
            steps.push(gemm(&n("qkv"), hb, w_qkv, 3 * c, c, qkv));
            steps.push(launch(
                &n("pos_norm"),
                "pos_norm",
                h as u64,
                (p.div_ceil(32).max(1) * 32) as u64,
                0,
                vec![
                    buf(qkv),
                    buf(positions),
                    wt(table),
                    wt(qs),
                    wt(ks),
                    buf(q),
                    buf(kc),
                    buf(vc),
                    sym(Symbol::Rows),
                    buf(slots),
                ],
            ));
            steps.push(launch(
                &n("attention"),
                if decode {
                    "attention_decode"
                } else {
                    "attention_prefill"
                },
                h as u64,
                128,
                if decode {
                    0
                } else {
                    (2 * KV_TILE * d * 4) as u32
                },
                vec![
                    buf(q),
                    buf(kc),
                    buf(vc),
                    buf(positions),
                    buf(att),
                    sym(Symbol::Rows),
                    buf(slots),
                ],
            ));
            steps.push(gemm(&n("o"), att, w_o, c, c, proj));
            steps.push(launch(
                &n("lerp_a"),
                "lerp_norm",
                1,
                256,
                0,
                vec![buf(hb), buf(proj), wt(lr_a), sym(Symbol::Rows)],
            ));
            steps.push(gemm(&n("fc"), hb, w_fc, 8 * c, c, fc));
            steps.push(launch(
                &n("swiglu"),
                "swiglu",
                1,
                256,
                0,
                vec![buf(fc), buf(act), sym(Symbol::Rows)],
            ));
            steps.push(gemm(&n("mlp_proj"), act, w_mp, c, 4 * c, proj));
            steps.push(launch(
                &n("lerp_m"),
                "lerp_norm",
                1,
                256,
                0,
                vec![buf(hb), buf(proj), wt(lr_m), sym(Symbol::Rows)],
            ));
        }
        steps.push(gemm("lm_head", hb, lm, s.vocab, c, logits));
        Program {
            name: if decode { "decode" } else { "prefill" }.into(),
            steps,
        }
    };
    b.plan.prefill = Some(program(false));
    b.plan.decode = Some(program(true));
    b.plan.weights_file_bytes = b.weights.len() as u64;
    Ok((b.plan.encode_to_vec(), b.weights))
}

fn load(bytes: &(Vec<u8>, Vec<u8>)) -> Result<Arc<LoadedPlan>> {
    Ok(Arc::new(LoadedPlan::from_bytes(
        &bytes.0,
        &bytes.1,
        "made.plan",
    )?))
}

// ---------------------------------------------------------------------------------------
// Comparison.

/// Relative Frobenius error of `got` against `want`, and the fraction of rows whose
/// argmax agrees. NaN anywhere makes the error infinite.
fn compare(got: &[f32], want: &[f32], vocab: usize) -> (f64, f64) {
    assert_eq!(got.len(), want.len(), "logit counts differ");
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() || !w.is_finite() {
            return (f64::INFINITY, 0.0);
        }
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    let argmax = |r: &[f32]| {
        r.iter()
            .enumerate()
            .fold((0, f32::MIN), |a, (i, &v)| if v > a.1 { (i, v) } else { a })
            .0
    };
    let rows = got.len() / vocab;
    let agree = (0..rows)
        .filter(|&r| {
            argmax(&got[r * vocab..(r + 1) * vocab]) == argmax(&want[r * vocab..(r + 1) * vocab])
        })
        .count();
    (
        (num / den.max(1e-300)).sqrt(),
        agree as f64 / rows.max(1) as f64,
    )
}

/// Checks the error bound of one call and tallies its top-1 agreement: a single decode
/// row is one argmax, so the 95% is judged over every row of a session.
struct Tally {
    bf16: bool,
    rows: usize,
    agree: f64,
}

impl Tally {
    fn check(&mut self, got: &[f32], want: &[f32], vocab: usize, what: &str) {
        let (err, top1) = compare(got, want, vocab);
        let tol = if self.bf16 { 2e-2 } else { 1e-5 };
        assert!(
            err <= tol,
            "{what}: relative error {err:.3e} against the CPU executor (tolerance {tol:.0e})"
        );
        let rows = got.len() / vocab;
        self.rows += rows;
        self.agree += top1 * rows as f64;
        eprintln!("{what}: relative error {err:.3e}, top-1 {top1:.3}");
    }

    fn finish(&self, what: &str) {
        let top1 = self.agree / self.rows.max(1) as f64;
        assert!(
            top1 >= 0.95,
            "{what}: top-1 agrees on {top1:.3} of {} rows (at least 0.95)",
            self.rows
        );
    }
}

fn prompt(vocab: usize, n: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 104729 + 5) % vocab) as u32)
        .collect()
}

/// Prefill (ragged when batch 2) then `steps` decodes, CUDA against CPU at every row.
fn cuda_matches_cpu(plan: &Arc<LoadedPlan>, batch: usize, steps: usize, what: &str) -> Result<()> {
    let gpu = Session::with_executor(Box::new(executor(Arc::clone(plan), batch)?));
    cuda_session_matches_cpu(plan, gpu, batch, steps, what)
}

/// As [`cuda_matches_cpu`], on a given CUDA session.
fn cuda_session_matches_cpu(
    plan: &Arc<LoadedPlan>,
    mut gpu: Session,
    batch: usize,
    steps: usize,
    what: &str,
) -> Result<()> {
    let v = plan.dims().vocab;
    let bf16 = plan.plan().weight_dtype == pb::DType::Bf16 as i32;
    let cap = plan.dims().max_seq_len;
    let lens = [40usize.min(cap - steps), 23usize.min(cap - steps)];
    let prompts: Vec<Vec<u32>> = (0..batch).map(|b| prompt(v, lens[b % 2], b + 1)).collect();
    let mut cpu = Session::new(Arc::clone(plan), batch)?;
    eprintln!("{what}: {}", gpu.executor().describe());
    assert_eq!(gpu.vocab(), v);
    let mut tally = Tally {
        bf16,
        rows: 0,
        agree: 0.0,
    };
    let want = cpu.prefill(&prompts)?;
    let got = gpu.prefill(&prompts)?;
    tally.check(&got, &want, v, &format!("{what}: prefill (batch {batch})"));
    assert_eq!(gpu.lens(), cpu.lens());
    let mut next: Vec<u32> = (0..batch).map(|b| ((b * 31 + 7) % v) as u32).collect();
    for i in 0..steps {
        let want = cpu.decode(&next)?;
        let got = gpu.decode(&next)?;
        tally.check(
            &got,
            &want,
            v,
            &format!("{what}: decode step {i} (batch {batch})"),
        );
        next = (0..batch)
            .map(|b| ngpt_runtime::sample::argmax(&want[b * v..(b + 1) * v]))
            .collect();
    }
    assert_eq!(gpu.lens(), cpu.lens());
    tally.finish(what);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Tests that run everywhere.

#[test]
fn helper_kernels_compile_with_nvrtc() -> Result<()> {
    if !cuda::probe().nvrtc {
        eprintln!("skipped: libnvrtc not found (LD_LIBRARY_PATH)");
        // CI sets LD_LIBRARY_PATH to the nvidia-cuda-nvrtc wheel, so this runs there.
        if std::env::var_os("CI").is_some() {
            anyhow::bail!("CI must provide libnvrtc for this check");
        }
        return Ok(());
    }
    // NVRTC itself, not the kernel cache: this must really compile.
    let nvrtc = |name: &str, src: &str| -> Result<String> {
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some("sm_90"),
            name: Some(format!("{name}.cu")),
            ..Default::default()
        };
        Ok(cudarc::nvrtc::compile_ptx_with_opts(src, opts)
            .map_err(|e| anyhow::anyhow!("{name}: {e:?}"))?
            .to_src())
    };
    // Generic, and specialized as the executor compiles it for a plan's widths.
    // attention_prefill_mma is compiled where the head dim is a multiple of 16 up to 128.
    for (prelude, mma) in [
        ("", false),
        (
            "#define NGPT_PD_C 1024\n#define NGPT_PD_D 64\n",
            true,
        ),
        (
            "#define NGPT_PD_C 36\n#define NGPT_PD_D 12\n#define NGPT_PD_MIN_BLOCKS 2\n",
            false,
        ),
        (
            "#define NGPT_PD_C 96\n#define NGPT_PD_D 16\n",
            true,
        ),
        (
            "#define NGPT_PD_C 256\n#define NGPT_PD_D 128\n",
            true,
        ),
        // With every opt-in of decode_persistent: weight-streaming buffers (cp.async),
        // the release/acquire grid barrier and the wide attention.
        (
            "#define NGPT_PD_C 1024\n#define NGPT_PD_D 64\n#define NGPT_PD_STREAM 1\n#define NGPT_PD_ACQREL 1\n#define NGPT_PD_WIDE 1\n",
            true,
        ),
    ] {
        let ptx = nvrtc(
            "ngpt_runtime_helpers",
            &format!("{prelude}{}", cuda::HELPERS_CU),
        )?;
        assert_eq!(
            ptx.contains(".entry attention_prefill_mma("),
            mma,
            "attention_prefill_mma with {prelude:?}"
        );
        if mma {
            assert!(ptx.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
        }
        assert_eq!(
            ptx.contains("cp.async.cg.shared.global"),
            prelude.contains("NGPT_PD_STREAM"),
            "weight streaming with {prelude:?}"
        );
        assert_eq!(
            ptx.contains("red.release.gpu.global.add.u32"),
            prelude.contains("NGPT_PD_ACQREL"),
            "release/acquire barrier with {prelude:?}"
        );
        for entry in [
            "f32_to_bf16",
            "spin",
            "gemv_bf16_1",
            "gemv_bf16_8",
            "gemv_f32_1",
            "gemv_f32_8",
            "gemv_i8_1",
            "gemv_i8_8",
            "gemv_i4_1",
            "gemv_i4_8",
            "dequant_rows",
            "decode_persistent",
        ] {
            assert!(
                ptx.contains(&format!(".entry {entry}(")),
                "{entry} missing from {ptx}"
            );
        }
    }
    // The made plan's module compiles too (ngpt.cu behind the prelude of its checked widths).
    let plan = load(&made_plan(TINY, 1)?)?;
    let source = cuda::module_source(plan.dims(), plan.module_dims());
    assert!(nvrtc(contract::MODULE, &source)?.contains(".entry attention_decode("));
    Ok(())
}

#[test]
fn without_cuda_construction_is_a_one_line_error() -> Result<()> {
    let Some(why) = skip() else {
        eprintln!("not applicable: CUDA is usable here, so construction succeeds");
        return Ok(());
    };
    let plan = load(&made_plan(TINY, 1)?)?;
    let err = match CudaSession::new(Arc::clone(&plan), 1) {
        Ok(_) => anyhow::bail!("CudaSession::new succeeded although {why}"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&why) && !err.contains('\n'), "{err}");
    assert!(Session::cuda(plan, 1).is_err());
    Ok(())
}

/// The made int8/int4 plans the GPU tests run are valid plans (this runs everywhere): they
/// load with their GEMM weights as I8/I4 matrices and F16 scales, run on the CPU executor,
/// and their logits track the f32 plan made from the same seed (the quantization error of
/// random weights, not a failure to read them).
#[test]
fn made_quantized_plans_load_and_run_on_the_cpu() -> Result<()> {
    let f32_plan = load(&made_plan(TINY, 3)?)?;
    let rows = ngpt_runtime::Rows {
        tokens: &[5, 17, 42, 8],
        positions: &[0, 1, 2, 3],
        slots: &[0; 4],
    };
    let want = ngpt_runtime::cpu::CpuExecutor::new(Arc::clone(&f32_plan), 1)?
        .run(ProgramKind::Prefill, &rows)?
        .to_vec();
    for (bits, block, tol) in [(8, 32, 0.05), (4, 16, 0.5)] {
        let plan = load(&made_plan(
            Shape {
                quant: Some((bits, block)),
                ..TINY
            },
            3,
        )?)?;
        let quant = plan
            .weights()
            .iter()
            .filter(|w| matches!(w, ngpt_runtime::plan::WeightData::Quant(q) if q.block == block as usize))
            .count();
        // Four GEMM weights a layer and lm_head.
        assert_eq!(quant, 4 * TINY.layers + 1, "int{bits}");
        let got = ngpt_runtime::cpu::CpuExecutor::new(Arc::clone(&plan), 1)?
            .run(ProgramKind::Prefill, &rows)?
            .to_vec();
        let (err, _) = compare(&got, &want, TINY.vocab);
        eprintln!("made int{bits} plan on the CPU against the f32 plan: relative error {err:.3e}");
        assert!(err > 0.0 && err < tol, "int{bits}: {err:.3e}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// GPU tests.

#[test]
fn made_plans_match_the_cpu_executor() -> Result<()> {
    gpu_or_skip!();
    for bf16 in [false, true] {
        let s = Shape { bf16, ..TINY };
        let plan = load(&made_plan(s, 3)?)?;
        for batch in [1, 2] {
            cuda_matches_cpu(&plan, batch, 8, if bf16 { "made bf16" } else { "made f32" })?;
        }
    }
    // An odd shape: 3 heads of 32, head_dim not a multiple of 64, vocab prime.
    cuda_matches_cpu(&load(&made_plan(ODD32, 5)?)?, 2, 5, "made odd")?;
    Ok(())
}

#[test]
fn gemv_kernels_and_cublas_both_match_the_cpu_executor() -> Result<()> {
    gpu_or_skip!();
    // Decode GEMMs of at most 8 rows run as gemv_* kernels, wider ones on cuBLAS; each
    // path against the CPU executor, f32 and bf16, with the gemv kernels turned off too.
    for bf16 in [false, true] {
        let plan = load(&made_plan(Shape { bf16, ..TINY }, 11)?)?;
        let what = if bf16 { "bf16" } else { "f32" };
        for batch in [3, 8, 9] {
            cuda_matches_cpu(&plan, batch, 3, &format!("made {what}, gemv on"))?;
        }
        for batch in [1, 3] {
            let mut exec = executor(Arc::clone(&plan), batch)?;
            exec.set_gemv(false);
            let gpu = Session::with_executor(Box::new(exec));
            cuda_session_matches_cpu(&plan, gpu, batch, 4, &format!("made {what}, cuBLAS only"))?;
        }
    }
    // Odd widths: k = 96 and 36 (not multiples of 8 for the last): the element-wise path.
    cuda_matches_cpu(&load(&made_plan(ODD12, 13)?)?, 2, 4, "made odd 36")?;
    Ok(())
}

#[test]
fn quantized_plans_match_the_cpu_executor() -> Result<()> {
    gpu_or_skip!();
    // Weight-only int8 and int4 plans (issue 23): prefill through the dequantizing GEMM
    // (dequant_rows, then Sgemm), decode of at most 8 rows through gemv_i8_* / gemv_i4_*
    // inside decode_persistent (and a graph), 9 rows through the dequantizing GEMM in a
    // graph, and with gemv=off every GEMM dequantizing; blocks of 16, 32 and 64; the odd
    // shape's K of 36 and 144 (not whole 16-byte runs: the element-wise path, a short last
    // block). Against the CPU executor within 1e-5 (module comment).
    for (bits, block) in [(8, 32), (4, 32), (4, 16), (8, 64)] {
        let what = format!("made int{bits}, block {block}");
        let plan = load(&made_plan(
            Shape {
                quant: Some((bits, block)),
                ..TINY
            },
            31 + u64::from(bits + block),
        )?)?;
        assert_eq!(
            plan.plan().weight_dtype,
            if bits == 8 {
                pb::DType::I8
            } else {
                pb::DType::I4
            } as i32
        );
        for batch in [1, 2, 9] {
            cuda_matches_cpu(&plan, batch, 4, &what)?;
        }
        let mut exec = executor(Arc::clone(&plan), 2)?;
        exec.set_gemv(false);
        let gpu = Session::with_executor(Box::new(exec));
        cuda_session_matches_cpu(&plan, gpu, 2, 3, &format!("{what}, gemv off"))?;
        // decode_persistent ran the quantized gemv entries.
        let mut exec = executor(Arc::clone(&plan), 1)?;
        exec.set_persistent(true);
        let v = plan.dims().vocab;
        run_rect(&mut exec, ProgramKind::Prefill, &[1, 2, 3], &[0, 1, 2], 3)?;
        for p in 3..6 {
            let got = run_rect(
                &mut exec,
                ProgramKind::Decode,
                &[(p % v) as i32],
                &[p as i32],
                1,
            )?;
            assert!(got.iter().all(|x| x.is_finite()));
        }
        assert_eq!(exec.persistent_runs(), 3, "{what}: decode_persistent");
    }
    for bits in [8, 4] {
        let plan = load(&made_plan(
            Shape {
                quant: Some((bits, 32)),
                ..ODD12
            },
            17,
        )?)?;
        cuda_matches_cpu(&plan, 2, 4, &format!("made odd 36, int{bits}"))?;
    }
    Ok(())
}

#[test]
fn compiled_plans_match_the_cpu_executor() -> Result<()> {
    gpu_or_skip!();
    let Ok(dirs) = std::env::var("NGPT_CUDA_TEST_PLANS") else {
        eprintln!("skipped: NGPT_CUDA_TEST_PLANS names no compiled plan directories");
        return Ok(());
    };
    for dir in dirs.split(',').filter(|d| !d.is_empty()) {
        let plan = Arc::new(LoadedPlan::load(dir.as_ref())?);
        cuda_matches_cpu(&plan, 1, 6, dir)?;
        cuda_matches_cpu(&plan, 2, 3, dir)?;
    }
    Ok(())
}

#[test]
fn decode_graph_replays_what_step_by_step_computes() -> Result<()> {
    gpu_or_skip!();
    let plan = load(&made_plan(TINY, 7)?)?;
    let v = plan.dims().vocab;
    let (mut a, mut b) = (
        executor(Arc::clone(&plan), 2)?,
        executor(Arc::clone(&plan), 2)?,
    );
    a.set_graph(true);
    b.set_graph(false);
    let toks: Vec<i32> = prompt(v, 10, 1).iter().map(|&t| t as i32).collect();
    let pos: Vec<i32> = (0..5).chain(0..5).collect();
    let pa = run_rect(&mut a, ProgramKind::Prefill, &toks, &pos, 5)?.to_vec();
    let pb_ = run_rect(&mut b, ProgramKind::Prefill, &toks, &pos, 5)?.to_vec();
    let (err, _) = compare(&pa, &pb_, v);
    eprintln!(
        "the same prefill on two executors: relative difference {err:.3e} (bitwise equal: {})",
        pa == pb_
    );
    assert!(err <= 1e-6, "the same prefill twice differs by {err:.3e}");
    for step in 0..6 {
        let t = [(step * 3 % v) as i32, (step * 5 % v) as i32];
        let p = [5 + step as i32, 5 + step as i32];
        let ga = run_rect(&mut a, ProgramKind::Decode, &t, &p, 1)?.to_vec();
        let gb = run_rect(&mut b, ProgramKind::Decode, &t, &p, 1)?.to_vec();
        let (err, _) = compare(&ga, &gb, v);
        assert!(
            err <= 1e-6,
            "decode step {step}: graph vs step by step {err:.3e}"
        );
    }
    assert_eq!(a.graph_captures(), 1, "decode should be captured once");
    assert_eq!(b.graph_captures(), 0);
    // A longer prefill grows the buffers: the next decode captures again.
    let toks: Vec<i32> = prompt(v, 40, 2).iter().map(|&t| t as i32).collect();
    let pos: Vec<i32> = (0..20).chain(0..20).collect();
    run_rect(&mut a, ProgramKind::Prefill, &toks, &pos, 20)?;
    // The first decode of the new shape warms up step by step, the second captures.
    let ga = run_rect(&mut a, ProgramKind::Decode, &[1, 2], &[20, 20], 1)?.to_vec();
    assert!(ga.iter().all(|x| x.is_finite()));
    assert_eq!(a.graph_captures(), 1);
    let ga = run_rect(&mut a, ProgramKind::Decode, &[3, 4], &[21, 21], 1)?.to_vec();
    assert!(ga.iter().all(|x| x.is_finite()));
    assert_eq!(a.graph_captures(), 2);
    Ok(())
}

/// Kernel ABI 3 on the GPU: calls of rows of several slots in any order (prefill chunks
/// from position 5 beside decode rows, tiles not aligned to the prefill kernel's), then
/// decode calls whose slot order changes between graph replays and persistent launches,
/// each call's logits against the CPU executor running the same calls.
#[test]
fn rows_of_any_slots_match_the_cpu_executor() -> Result<()> {
    gpu_or_skip!();
    let plan = load(&made_plan(TINY, 5)?)?;
    let v = plan.dims().vocab;
    let mut cpu = ngpt_runtime::cpu::CpuExecutor::new(Arc::clone(&plan), 3)?;
    let mut gpu = executor(Arc::clone(&plan), 3)?;
    let seq = |s: usize, p: usize| ((7 * p + 11 * s + 3) % v) as i32;
    // (slot, first position, rows)
    let prefill: [&[(usize, usize, usize)]; 3] = [
        &[(2, 0, 5), (0, 0, 40)],
        &[(1, 0, 37), (2, 5, 30), (0, 40, 1)],
        &[(0, 41, 3), (1, 37, 1), (2, 35, 2)],
    ];
    let mut next = [44usize, 38, 37];
    let mut calls: Vec<(ProgramKind, Vec<(usize, usize)>)> = prefill
        .iter()
        .map(|chunks| {
            let rows = chunks
                .iter()
                .flat_map(|&(s, p0, n)| (p0..p0 + n).map(move |p| (s, p)))
                .collect();
            (ProgramKind::Prefill, rows)
        })
        .collect();
    for step in 0..6 {
        let order: [usize; 3] = [[2, 0, 1], [0, 1, 2], [1, 2, 0]][step % 3];
        calls.push((
            ProgramKind::Decode,
            order.iter().map(|&s| (s, next[s])).collect(),
        ));
        order.iter().for_each(|&s| next[s] += 1);
    }
    for (i, (kind, rows)) in calls.iter().enumerate() {
        let tokens: Vec<i32> = rows.iter().map(|&(s, p)| seq(s, p)).collect();
        let positions: Vec<i32> = rows.iter().map(|&(_, p)| p as i32).collect();
        let slots: Vec<i32> = rows.iter().map(|&(s, _)| s as i32).collect();
        let rq = ngpt_runtime::Rows {
            tokens: &tokens,
            positions: &positions,
            slots: &slots,
        };
        let want = cpu.run(*kind, &rq)?.to_vec();
        let got = gpu.run(*kind, &rq)?.to_vec();
        let (err, agree) = compare(&got, &want, v);
        eprintln!(
            "call {i} ({kind:?}, {} rows): relative error {err:.3e}",
            rows.len()
        );
        assert!(
            err <= 1e-4 && agree >= 0.9,
            "call {i}: {err:.3e}, argmax agreement {agree}"
        );
    }
    Ok(())
}

#[test]
fn persistent_decode_matches_launch_by_launch() -> Result<()> {
    gpu_or_skip!();
    // decode_persistent (one launch, grid barriers, split attention), with its steps
    // folded (lerp_norm and swiglu into the gemv after them, pos_norm into attention) and
    // without, against the same plan launched step by step: it fired and folded, equal
    // logits, on odd shapes (head_dim 12 and
    // 32, prime vocabularies, 3 and 8 rows) and at a KV length past 32 tiles of 32 keys
    // (more tiles than attention splits, so splits hold 2 tiles and some none).
    let long = Shape {
        layers: 2,
        heads: 2,
        embd: 64,
        vocab: 101,
        max_seq: 1200,
        bf16: true,
        quant: None,
    };
    let cases = [
        (TINY, 1, 4, "tiny f32"),
        (Shape { bf16: true, ..TINY }, 3, 4, "tiny bf16"),
        (TINY, 8, 4, "tiny f32, 8 rows"),
        (ODD12, 3, 12, "head_dim 12"),
        (ODD32, 2, 5, "head_dim 32"),
        (long, 1, 1100, "1100 cached keys"),
        (
            Shape {
                quant: Some((4, 32)),
                ..TINY
            },
            2,
            4,
            "tiny int4",
        ),
        (
            Shape {
                quant: Some((8, 16)),
                ..TINY
            },
            3,
            4,
            "tiny int8",
        ),
    ];
    for (seed, (shape, batch, prompt_len, what)) in cases.into_iter().enumerate() {
        let plan = load(&made_plan(shape, 20 + seed as u64)?)?;
        let v = plan.dims().vocab;
        let (mut a, mut b, mut c, mut s) = (
            executor(Arc::clone(&plan), batch)?,
            executor(Arc::clone(&plan), batch)?,
            executor(Arc::clone(&plan), batch)?,
            executor(Arc::clone(&plan), batch)?,
        );
        a.set_persistent(true);
        a.set_persistent_fusion(true);
        a.set_persistent_stream(false)?;
        b.set_persistent(false);
        c.set_persistent(true);
        c.set_persistent_fusion(false);
        c.set_persistent_stream(false)?;
        // Folded, with the weights streamed into shared memory ahead of each gemv.
        s.set_persistent(true);
        s.set_persistent_fusion(true);
        assert!(
            s.set_persistent_stream(true)?,
            "{what}: no room for the streaming buffers"
        );
        let toks: Vec<i32> = prompt(v, batch * prompt_len, seed)
            .iter()
            .map(|&t| t as i32)
            .collect();
        let pos: Vec<i32> = (0..batch).flat_map(|_| 0..prompt_len as i32).collect();
        for ex in [&mut a, &mut b, &mut c, &mut s] {
            run_rect(ex, ProgramKind::Prefill, &toks, &pos, prompt_len)?;
        }
        let steps = 4;
        let mut agree = 0.0;
        for step in 0..steps {
            let t: Vec<i32> = (0..batch)
                .map(|r| ((step * 7 + r * 3) % v) as i32)
                .collect();
            let p = vec![(prompt_len + step) as i32; batch];
            let ga = run_rect(&mut a, ProgramKind::Decode, &t, &p, 1)?.to_vec();
            let gb = run_rect(&mut b, ProgramKind::Decode, &t, &p, 1)?.to_vec();
            let gc = run_rect(&mut c, ProgramKind::Decode, &t, &p, 1)?.to_vec();
            let gs = run_rect(&mut s, ProgramKind::Decode, &t, &p, 1)?.to_vec();
            let (err, top1) = compare(&ga, &gb, v);
            let (err_c, _) = compare(&gc, &gb, v);
            let (err_s, _) = compare(&gs, &gb, v);
            eprintln!("{what}: decode step {step}: persistent vs launch by launch {err:.3e} (steps folded {:?}), unfolded {err_c:.3e}, weights streamed {err_s:.3e}, top-1 {top1:.3}", a.persistent_folds());
            assert!(
                err <= 1e-5 && err_c <= 1e-5 && err_s <= 1e-5,
                "{what}, decode step {step}: persistent vs launch by launch {err:.3e}, unfolded {err_c:.3e}, streamed {err_s:.3e}"
            );
            agree += top1;
        }
        assert!(
            agree / steps as f64 >= 0.95,
            "{what}: top-1 agreement {agree}/{steps}"
        );
        assert_eq!(
            a.persistent_runs(),
            steps as u64,
            "{what}: decode_persistent should run every step"
        );
        assert_eq!(c.persistent_runs(), steps as u64);
        assert_eq!(s.persistent_runs(), steps as u64);
        // Every layer folds its two lerp_norms, its swiglu and its pos_norm.
        let layers = shape.layers;
        assert_eq!(a.persistent_folds(), (2 * layers, layers, layers), "{what}");
        assert_eq!(c.persistent_folds(), (0, 0, 0));
        assert_eq!(b.persistent_runs(), 0);
    }
    Ok(())
}

#[test]
fn tensor_core_prefill_attention_matches_the_f32_kernel() -> Result<()> {
    gpu_or_skip!();
    // attention_prefill_mma (bf16 mma.sync) against the plan's f32 attention_prefill, on bf16
    // plans: it fired, logits within bf16's tolerance with the same top-1, on head dims 16,
    // 32 and 64, query tiles whole and partial, and a second prefill chunk that attends
    // to the keys the first one cached (tests/host_emulation.rs checks the kernel itself
    // against exact attention on the CPU).
    let d64 = Shape {
        layers: 2,
        heads: 2,
        embd: 128,
        vocab: 131,
        max_seq: 300,
        bf16: true,
        quant: None,
    };
    let cases = [
        (Shape { bf16: true, ..TINY }, 2, [40, 20], "head_dim 16"),
        (
            Shape {
                bf16: true,
                ..ODD32
            },
            3,
            [20, 9],
            "head_dim 32",
        ),
        (d64, 1, [200, 70], "head_dim 64"),
    ];
    for (seed, (shape, batch, chunks, what)) in cases.into_iter().enumerate() {
        let plan = load(&made_plan(shape, 40 + seed as u64)?)?;
        let v = plan.dims().vocab;
        let mut mma = executor(Arc::clone(&plan), batch)?;
        let mut f32 = executor(Arc::clone(&plan), batch)?;
        assert!(
            mma.set_prefill_mma(true),
            "{what}: attention_prefill_mma unavailable"
        );
        f32.set_prefill_mma(false);
        let mut start = 0;
        for (ci, len) in chunks.into_iter().enumerate() {
            let toks: Vec<i32> = prompt(v, batch * len, seed + ci)
                .iter()
                .map(|&t| t as i32)
                .collect();
            let pos: Vec<i32> = (0..batch)
                .flat_map(|_| start as i32..(start + len) as i32)
                .collect();
            let got = run_rect(&mut mma, ProgramKind::Prefill, &toks, &pos, len)?.to_vec();
            let want = run_rect(&mut f32, ProgramKind::Prefill, &toks, &pos, len)?.to_vec();
            let (err, top1) = compare(&got, &want, v);
            eprintln!("{what}: chunk {ci} ({len} tokens from {start}): tensor cores vs f32 {err:.3e}, top-1 {top1:.3}");
            assert!(
                err <= 2e-2 && top1 >= 0.95,
                "{what}, chunk {ci}: tensor cores vs f32 {err:.3e}, top-1 {top1}"
            );
            start += len;
        }
        assert_eq!(
            mma.prefill_mma_runs(),
            2,
            "{what}: the kernel should run every prefill"
        );
        assert_eq!(f32.prefill_mma_runs(), 0);
    }
    // f32 plans keep the f32 kernel (their tolerance is 1e-5).
    let plan = load(&made_plan(TINY, 43)?)?;
    let mut ex = executor(plan, 1)?;
    assert!(!ex.set_prefill_mma(true));
    Ok(())
}

#[test]
fn traced_steps_match_the_cpu_executor() -> Result<()> {
    gpu_or_skip!();
    let plan = load(&made_plan(TINY, 9)?)?;
    let toks: Vec<u32> = prompt(plan.dims().vocab, 7, 3);
    let mut cpu_steps = vec![];
    let mut cpu = Session::new(Arc::clone(&plan), 1)?;
    cpu.prefill_traced(&toks, &mut |name, width, v| {
        cpu_steps.push((name.to_string(), width, v.to_vec()))
    })?;
    let mut gpu_steps = vec![];
    let mut gpu = CudaSession::with_options(Arc::clone(&plan), 1, &options()?)?;
    gpu.prefill_traced(&toks, &mut |name, width, v| {
        gpu_steps.push((name.to_string(), width, v.to_vec()))
    })?;
    assert_eq!(cpu_steps.len(), gpu_steps.len());
    for ((cn, cw, cv), (gn, gw, gv)) in cpu_steps.iter().zip(&gpu_steps) {
        assert_eq!((cn, cw), (gn, gw));
        let (err, _) = compare(gv, cv, *cw);
        assert!(err <= 1e-5, "step {cn}: {err:.3e}");
    }
    Ok(())
}

#[test]
fn unwritten_logits_cannot_pass() -> Result<()> {
    gpu_or_skip!();
    // A prefill whose last step (the lm_head GEMM) is gone: nothing writes the logits.
    let (bytes, weights) = made_plan(TINY, 11)?;
    let mut plan = Plan::decode(bytes.as_slice())?;
    if let Some(p) = plan.prefill.as_mut() {
        p.steps.pop();
    }
    let plan = load(&(plan.encode_to_vec(), weights))?;
    for check in [false, true] {
        let mut ex = executor(Arc::clone(&plan), 1)?;
        ex.set_check(check);
        match run_rect(&mut ex, ProgramKind::Prefill, &[1, 2, 3], &[0, 1, 2], 3) {
            Ok(l) => {
                assert!(!check, "check mode let NaN logits through");
                assert!(l.iter().all(|x| x.is_nan()), "unwritten logits are not NaN");
            }
            Err(e) => {
                assert!(check, "{e}");
                assert!(e.to_string().contains("NaN"), "{e}");
            }
        }
    }
    Ok(())
}

#[test]
fn a_tampered_plan_is_an_error_not_a_fault() -> Result<()> {
    gpu_or_skip!();
    let (bytes, weights) = made_plan(TINY, 13)?;
    // `att` one element a row short: the attention kernel would write past it.
    let mut plan = Plan::decode(bytes.as_slice())?;
    for b in &mut plan.buffers {
        if b.name == "att" {
            if let Some(e) = b.elements.as_mut() {
                e.c_rows -= 1;
            }
        }
    }
    let plan = load(&(plan.encode_to_vec(), weights.clone()))?;
    let cpu = Session::new(Arc::clone(&plan), 1)?.prefill(&[vec![1, 2, 3]]);
    assert!(cpu.is_err(), "the CPU executor accepted it");
    let err = match CudaSession::with_options(Arc::clone(&plan), 1, &options()?)?
        .prefill(&[vec![1, 2, 3]])
    {
        Ok(_) => anyhow::bail!("the CUDA executor accepted a short buffer"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("att"), "{err}");
    // A module width that disagrees with the config is refused when the plan loads,
    // before either executor sees it.
    let mut plan = Plan::decode(bytes.as_slice())?;
    for d in &mut plan.modules[0].defines {
        if d.name == "NGPT_C" {
            d.value *= 2;
        }
    }
    let err = match load(&(plan.encode_to_vec(), weights)) {
        Ok(_) => anyhow::bail!("a mismatched module width was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("NGPT_C"), "{err}");
    // Out-of-range requests are refused before anything runs.
    let plan = load(&made_plan(TINY, 13)?)?;
    let mut ex = executor(plan, 1)?;
    assert!(run_rect(&mut ex, ProgramKind::Prefill, &[97], &[0], 1).is_err());
    assert!(run_rect(&mut ex, ProgramKind::Prefill, &[1], &[64], 1).is_err());
    assert!(run_rect(&mut ex, ProgramKind::Prefill, &[1], &[0], 1).is_ok());
    Ok(())
}
