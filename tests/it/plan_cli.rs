//! Launch plans as users meet them.
//!
//! Part 1, the runtime's loader and executor on tampered plans: a real plan is built in
//! memory from a tiny `ngpt init` model, then truncated, bit-flipped or edited field by
//! field. Every tamper must be an error naming what is wrong (at load, or at run time for
//! what depends on the request), never a panic or an out-of-bounds access.
//!
//! Part 2, the binary: `ngpt compile` then `ngpt plan show`, `ngpt generate` (greedy,
//! streaming, batches, sampling, bad arguments), `ngpt logits --engine plan-cpu` and bf16
//! plans.

use crate::common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Output;
use std::sync::Arc;

use anyhow::{Context, Result};
use common::*;
use ngpt_compiler::compare::compare;
use ngpt_compiler::plan::{lower, WeightDtype};
use ngpt_compiler::{compile, import, init};
use ngpt_runtime::listing::{listing, Shape};
use ngpt_runtime::plan::LoadedPlan;
use ngpt_runtime::session::Session;
use ngpt_schemas::plan::{self as pb, arg, operand, step, Plan};
use ngpt_schemas::prost::Message;

// ---------------------------------------------------------------------------------------
// Part 1: tampered plans through the runtime.
// ---------------------------------------------------------------------------------------

/// A real plan of a tiny model (2 layers, 2 heads, n_embd 8, vocab 16, KV capacity 32)
/// and its `model.weights` bytes.
fn built() -> Result<(Plan, Vec<u8>)> {
    let dir = tempfile::tempdir()?;
    let mut o = small_opts();
    o.n_layer = 2;
    init::write(dir.path(), &o)?;
    let ckpt = import::load(dir.path())?;
    let compiled = compile::compile(&ckpt, &compile::Options::default())?;
    let l = lower(
        &compiled.graph,
        &ckpt.config,
        WeightDtype::F32,
        32,
        "5eed5eed",
    )?;
    Ok((l.plan, l.weights))
}

/// What happened to one plan.
#[derive(Debug)]
enum Outcome {
    LoadErr(String),
    RunErr(String),
    Ran,
}

/// Loads the plan and, if it loads, runs a ragged batch of two through prefill and two
/// decode steps and lists it. A run that returns logits of the wrong size is a broken
/// contract (callers slice rows by vocab) and panics here, so the harness reports it.
fn outcome(plan: &[u8], weights: &[u8]) -> Outcome {
    let p = match LoadedPlan::from_bytes(plan, weights, "model.plan") {
        Ok(p) => Arc::new(p),
        Err(e) => return Outcome::LoadErr(e.to_string()),
    };
    let _ = listing(
        &p,
        Shape {
            batch: 2,
            tokens: 5,
            context: 6,
        },
    );
    let run = || -> ngpt_runtime::Result<()> {
        let mut s = Session::new(Arc::clone(&p), 2)?;
        let v = s.vocab();
        let logits = s.prefill(&[vec![1, 2, 3, 4, 5], vec![6, 7, 8]])?;
        assert_eq!(
            logits.len(),
            2 * 5 * v,
            "prefill logits are not [B x T, vocab]"
        );
        for next in [[9, 10], [11, 12]] {
            let logits = s.decode(&next)?;
            assert_eq!(logits.len(), 2 * v, "decode logits are not [B, vocab]");
        }
        Ok(())
    };
    match run() {
        Ok(()) => Outcome::Ran,
        Err(e) => Outcome::RunErr(e.to_string()),
    }
}

/// `outcome` under `catch_unwind`: a panic becomes `Err` with its message.
fn outcome_no_panic(plan: &[u8], weights: &[u8]) -> std::result::Result<Outcome, String> {
    catch_unwind(AssertUnwindSafe(|| outcome(plan, weights))).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

fn steps_mut(p: &mut Plan) -> &mut Vec<pb::Step> {
    &mut p.prefill.as_mut().expect("prefill").steps
}

/// The first prefill launch of `entry`.
fn launch_mut<'a>(p: &'a mut Plan, entry: &str) -> &'a mut pb::Launch {
    steps_mut(p)
        .iter_mut()
        .find_map(|s| match s.kind.as_mut() {
            Some(step::Kind::Launch(l)) if l.entry == entry => Some(l),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no `{entry}` launch"))
}

/// The prefill GEMM step called `name`.
fn gemm_mut<'a>(p: &'a mut Plan, name: &str) -> &'a mut pb::Gemm {
    steps_mut(p)
        .iter_mut()
        .find_map(|s| match s.kind.as_mut() {
            Some(step::Kind::Gemm(g)) if s.name == name => Some(g),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no GEMM `{name}`"))
}

fn buffer_index(p: &Plan, name: &str) -> u32 {
    p.buffers
        .iter()
        .position(|b| b.name == name)
        .unwrap_or_else(|| panic!("no buffer `{name}`")) as u32
}

fn buffer_arg(i: u32) -> pb::Arg {
    pb::Arg {
        value: Some(arg::Value::Buffer(i)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Load,
    Run,
}

type Edit = Box<dyn Fn(&mut Plan, &mut Vec<u8>)>;

/// One tamper: what it does, where it must fail, and text the message must hold.
struct Case {
    name: String,
    stage: Stage,
    needles: Vec<String>,
    edit: Edit,
}

fn case(
    name: &str,
    stage: Stage,
    needles: &[&str],
    edit: impl Fn(&mut Plan, &mut Vec<u8>) + 'static,
) -> Case {
    Case {
        name: name.to_string(),
        stage,
        needles: needles.iter().map(|s| s.to_string()).collect(),
        edit: Box::new(edit),
    }
}

fn tamper_cases(plan: &Plan, weights: &[u8]) -> Vec<Case> {
    use Stage::*;
    let w0 = plan.weights[0].name.clone();
    let w1 = plan.weights[1].name.clone();
    let file_len = weights.len().to_string();
    let n_buf = plan.buffers.len().to_string();
    let mut cases = vec![
        case(
            "format 3, from a newer ngpt",
            Load,
            &["plan format 3", "reads format 2", "a newer ngpt"],
            |p, _| p.format_major = 3,
        ),
        case(
            "format 1, which carried kernel source",
            Load,
            &[
                "plan format 1 (written by ngpt 0.1.0)",
                "reads format 2",
                "recompile",
            ],
            |p, _| {
                p.format_major = 1;
                p.producer = "ngpt 0.1.0".into();
            },
        ),
        case(
            "a producer with a newline",
            Load,
            &["written by ngpt\\n0.1"],
            |p, _| {
                p.format_major = 1;
                p.producer = "ngpt\n0.1".into();
            },
        ),
        case(
            "kernel source in the plan",
            Load,
            &["carries 37 bytes of kernel source", "never carries code"],
            |p, _| p.modules[0].source = "extern \"C\" __global__ void embed() {}".into(),
        ),
        case(
            "a kernel module the runtime does not have",
            Load,
            &["kernel module `mine` is not one this runtime has"],
            |p, _| p.modules[0].name = "mine".into(),
        ),
        case(
            "another kernel ABI",
            Load,
            &["kernel ABI 1", "this runtime has ABI 3"],
            |p, _| p.modules[0].abi = 1,
        ),
        case(
            "an ABI 2 plan (rows found their sequence as r / tokens)",
            Load,
            &[
                "lowered for kernel ABI 2",
                "this runtime has ABI 3",
                "recompile the checkpoint",
            ],
            |p, _| p.modules[0].abi = 2,
        ),
        case(
            "ABI 2's TOKENS symbol where ABI 3 takes the slots",
            Load,
            &["argument 9 of `pos_norm`", "a buffer it reads", "symbol 3"],
            |p, _| {
                launch_mut(p, "pos_norm").args[9] = pb::Arg {
                    value: Some(arg::Value::Symbol(pb::Symbol::Tokens as i32)),
                }
            },
        ),
        case(
            "a module width that disagrees with the config",
            Load,
            &["NGPT_D = 8 differs from the plan's config (4)"],
            |p, _| {
                for d in &mut p.modules[0].defines {
                    if d.name == "NGPT_D" {
                        d.value = 8;
                    }
                }
            },
        ),
        case(
            "an unknown module width",
            Load,
            &["unknown compile-time width `NGPT_EVIL`"],
            |p, _| {
                p.modules[0].defines.push(pb::Define {
                    name: "NGPT_EVIL".into(),
                    value: 1,
                })
            },
        ),
        case(
            "a module width missing",
            Load,
            &["`NGPT_KV_TILE` is missing"],
            |p, _| p.modules[0].defines.retain(|d| d.name != "NGPT_KV_TILE"),
        ),
        case(
            "a second kernel module",
            Load,
            &["names 2 kernel modules"],
            |p, _| {
                let m = p.modules[0].clone();
                p.modules.push(m);
            },
        ),
        case(
            "a block the kernel cannot take",
            Load,
            &["h.0.attn.residual.in.norm", "multiple of 32"],
            |p, _| {
                launch_mut(p, "norm_rows")
                    .block
                    .as_mut()
                    .unwrap()
                    .x
                    .as_mut()
                    .unwrap()
                    .c0 = 48
            },
        ),
        case("no model config", Load, &["no model config"], |p, _| {
            p.config = None
        }),
        case(
            "n_head x head_dim != n_embd",
            Load,
            &["n_head 3", "n_embd 8"],
            |p, _| p.config.as_mut().unwrap().n_head = 3,
        ),
        case(
            "vocab_size 2^30",
            Load,
            &["vocab_size", "1073741824"],
            |p, _| p.config.as_mut().unwrap().vocab_size = 1 << 30,
        ),
        case("max_seq_len 0", Load, &["max_seq_len", "= 0"], |p, _| {
            p.max_seq_len = 0
        }),
        case(
            "weight offset at the end of model.weights",
            Load,
            &[&w0, "outside model.weights"],
            |p, _| p.weights[0].offset = p.weights_file_bytes,
        ),
        case(
            "weight offset + bytes overflows u64",
            Load,
            &[&w0, "outside model.weights"],
            |p, _| p.weights[0].offset = u64::MAX - 8,
        ),
        case(
            "overlapping weights",
            Load,
            &[&w0, &w1, "overlap"],
            |p, _| p.weights[1].offset = p.weights[0].offset,
        ),
        case(
            "model.weights one byte shorter than weights_file_bytes",
            Load,
            &["model.weights holds", &file_len],
            |_, w| {
                w.pop();
            },
        ),
        case(
            "model.weights one byte longer than weights_file_bytes",
            Load,
            &["model.weights holds", &file_len],
            |_, w| w.push(0),
        ),
        case(
            "weight shape does not match its bytes",
            Load,
            &[&w0, "do not match shape"],
            |p, _| p.weights[0].shape[0] += 1,
        ),
        case(
            "weight dtype BF16 over F32 bytes",
            Load,
            &[&w0, "do not match shape"],
            |p, _| p.weights[0].dtype = pb::DType::Bf16 as i32,
        ),
        case(
            "weight dtype I32",
            Load,
            &[&w0, "not F32 or BF16"],
            |p, _| p.weights[0].dtype = pb::DType::I32 as i32,
        ),
        case(
            "weight shape whose element count overflows",
            Load,
            &[&w0, "do not match shape"],
            |p, _| p.weights[0].shape = vec![u64::MAX, 2],
        ),
        case(
            "unknown entry, not in the module",
            Load,
            &["embed_v2", "not in module"],
            |p, _| launch_mut(p, "embed").entry = "embed_v2".into(),
        ),
        case(
            "unknown entry, declared by the module",
            Load,
            &["lists entry `embed_v2`, which the runtime does not have"],
            |p, _| {
                p.modules[0].entries.push("embed_v2".into());
                launch_mut(p, "embed").entry = "embed_v2".into();
            },
        ),
        case("module index out of range", Load, &["module 7"], |p, _| {
            launch_mut(p, "embed").module = 7
        }),
        case(
            "one argument missing",
            Load,
            &["`embed` takes 4 arguments", "passes 3"],
            |p, _| {
                launch_mut(p, "embed").args.pop();
            },
        ),
        case(
            "one argument too many",
            Load,
            &["`norm_rows` takes 3 arguments", "passes 4"],
            |p, _| {
                let l = launch_mut(p, "norm_rows");
                let extra = l.args[0];
                l.args.push(extra);
            },
        ),
        case(
            "a buffer where a weight goes",
            Load,
            &["argument 1 of `embed`", "a weight", "buffer 0"],
            |p, _| launch_mut(p, "embed").args[1] = buffer_arg(0),
        ),
        case(
            "a float constant where a buffer goes",
            Load,
            &[
                "argument 0 of `swiglu`",
                "a buffer it reads",
                "the float 1.5",
            ],
            |p, _| {
                launch_mut(p, "swiglu").args[0] = pb::Arg {
                    value: Some(arg::Value::FloatConst(1.5)),
                }
            },
        ),
        case(
            "an unspecified symbol",
            Load,
            &["argument 3 of `embed`", "request size", "symbol 0"],
            |p, _| {
                launch_mut(p, "embed").args[3] = pb::Arg {
                    value: Some(arg::Value::Symbol(0)),
                }
            },
        ),
        case(
            "an argument holding nothing",
            Load,
            &["argument 6 of `pos_norm`", "found nothing"],
            |p, _| launch_mut(p, "pos_norm").args[6] = pb::Arg { value: None },
        ),
        case(
            "a buffer index out of range",
            Load,
            &["argument 2 of `embed`", "buffer 999 does not exist", &n_buf],
            |p, _| launch_mut(p, "embed").args[2] = buffer_arg(999),
        ),
        case(
            "a weight index out of range",
            Load,
            &["argument 2 of `lerp_norm`", "weight 4096 does not exist"],
            |p, _| {
                launch_mut(p, "lerp_norm").args[2] = pb::Arg {
                    value: Some(arg::Value::Weight(4096)),
                }
            },
        ),
        case(
            "a GEMM output buffer out of range",
            Load,
            &["h.0.attn.qkv", "operand c: buffer 999 does not exist"],
            |p, _| {
                gemm_mut(p, "h.0.attn.qkv").c = Some(pb::Operand {
                    source: Some(operand::Source::Buffer(999)),
                })
            },
        ),
        case(
            "a GEMM writing a weight",
            Load,
            &["lm_head", "operand c should be a buffer, found weight 0"],
            |p, _| {
                gemm_mut(p, "lm_head").c = Some(pb::Operand {
                    source: Some(operand::Source::Weight(0)),
                })
            },
        ),
        case(
            "a GEMM weight out of range",
            Load,
            &["h.0.mlp.fc", "operand a: weight 4096 does not exist"],
            |p, _| {
                gemm_mut(p, "h.0.mlp.fc").a = Some(pb::Operand {
                    source: Some(operand::Source::Weight(4096)),
                })
            },
        ),
        case(
            "a GEMM without k",
            Load,
            &["GEMM without m, n or k"],
            |p, _| gemm_mut(p, "h.0.mlp.out").k = None,
        ),
        case("an empty step", Load, &["empty step"], |p, _| {
            steps_mut(p)[3].kind = None
        }),
        case(
            "no decode program",
            Load,
            &["program", "missing"],
            |p, _| p.decode = None,
        ),
        case(
            "no kernel modules",
            Load,
            &["names 0 kernel modules"],
            |p, _| p.modules.clear(),
        ),
        case(
            "a buffer without a size",
            Load,
            &["`qkv`", "no valid dtype, kind or size"],
            |p, _| {
                let i = buffer_index(p, "qkv") as usize;
                p.buffers[i].elements = None;
            },
        ),
        case(
            "a buffer of unspecified kind",
            Load,
            &["`att`", "no valid dtype, kind or size"],
            |p, _| {
                let i = buffer_index(p, "att") as usize;
                p.buffers[i].kind = 0;
            },
        ),
        case(
            "a buffer of 2^36 elements per row",
            Load,
            &["`fc`", "c_rows = 68719476736", "exceeds"],
            |p, _| {
                let i = buffer_index(p, "fc") as usize;
                p.buffers[i].elements.as_mut().unwrap().c_rows = 1 << 36;
            },
        ),
        case(
            "a KV cache of 2^30 elements",
            Load,
            &["`h.1.v_cache`", "c0 = 1073741824", "exceeds"],
            |p, _| {
                let i = buffer_index(p, "h.1.v_cache") as usize;
                p.buffers[i].elements.as_mut().unwrap().c0 = 1 << 30;
            },
        ),
        case(
            "no tokens buffer",
            Load,
            &["no buffer named `tokens`"],
            |p, _| {
                let i = buffer_index(p, "tokens") as usize;
                p.buffers[i].name = "tokenz".into();
            },
        ),
        case(
            "positions of dtype F32",
            Load,
            &["`positions` should be I32", "found F32"],
            |p, _| {
                let i = buffer_index(p, "positions") as usize;
                p.buffers[i].dtype = pb::DType::F32 as i32;
            },
        ),
        case(
            "vocab_size wider than the logits buffer",
            Load,
            &["`logits`", "17 elements per row", "found F32 with 16"],
            |p, _| p.config.as_mut().unwrap().vocab_size = 17,
        ),
        // What depends on the request is checked when it runs.
        case(
            "GEMM k larger than its leading dimension",
            Run,
            &["h.0.attn.qkv", "leading dimension 8 < 108"],
            |p, _| gemm_mut(p, "h.0.attn.qkv").k.as_mut().unwrap().c0 += 100,
        ),
        case(
            "GEMM k and leading dimensions larger: reads past its operands",
            Run,
            &["h.0.attn.qkv", "operands too small"],
            |p, _| {
                let g = gemm_mut(p, "h.0.attn.qkv");
                g.k.as_mut().unwrap().c0 += 100;
                g.lda += 100;
                g.ldb += 100;
            },
        ),
        case(
            "GEMM m larger: writes past its output",
            Run,
            &["h.1.mlp.fc", "operands too small"],
            |p, _| {
                let g = gemm_mut(p, "h.1.mlp.fc");
                g.m.as_mut().unwrap().c0 = 1000;
                g.ldc = 1000;
            },
        ),
        case(
            "GEMM n in rows twice over",
            Run,
            &["lm_head", "operands too small"],
            |p, _| gemm_mut(p, "lm_head").n.as_mut().unwrap().c_rows = 2,
        ),
        case(
            "GEMM ldc one larger",
            Run,
            &["h.0.attn.out", "operands too small"],
            |p, _| gemm_mut(p, "h.0.attn.out").ldc += 1,
        ),
        case(
            "GEMM writing its own input",
            Run,
            &["h.0.mlp.out", "distinct from c"],
            |p, _| {
                let g = gemm_mut(p, "h.0.mlp.out");
                g.c = g.b;
            },
        ),
        case(
            "a kernel given the same buffer twice",
            Run,
            &["h.0.attn.residual.in.norm", "passed twice"],
            |p, _| {
                let l = launch_mut(p, "norm_rows");
                l.args[1] = l.args[0];
            },
        ),
        case(
            "an int32 buffer where floats are read",
            Run,
            &["h.0.mlp.gated", "should be f32"],
            |p, _| {
                let t = buffer_index(p, "tokens");
                launch_mut(p, "swiglu").args[0] = buffer_arg(t);
            },
        ),
        case(
            "max_seq_len beyond the KV caches",
            Load,
            &["`h.0.k_cache`", "512 elements per sequence", "256 x B"],
            |p, _| p.max_seq_len = 64,
        ),
        case(
            "logits buffer and lm_head one column short",
            Load,
            &["`logits`", "16 elements per row", "found F32 with 15"],
            |p, _| {
                let i = buffer_index(p, "logits") as usize;
                p.buffers[i].elements.as_mut().unwrap().c_rows = 15;
                let g = gemm_mut(p, "lm_head");
                g.m.as_mut().unwrap().c0 = 15;
                g.ldc = 15;
            },
        ),
    ];
    // Every buffer shrunk by one element per row (per sequence for the caches): the run
    // must fail, never read or write past it.
    for (i, b) in plan.buffers.iter().enumerate() {
        let e = b.elements.unwrap();
        let (what, field) = if e.c_rows > 0 {
            ("row", 1)
        } else {
            ("sequence", 2)
        };
        // The named inputs and outputs and the KV caches are checked at load.
        let at_load = ["tokens", "positions", "slots", "logits"].contains(&b.name.as_str())
            || b.kind == pb::BufferKind::Cache as i32;
        let stage = if at_load { Load } else { Run };
        cases.push(Case {
            name: format!("buffer `{}` one element short per {what}", b.name),
            stage,
            needles: vec![],
            edit: Box::new(move |p, _| {
                let e = p.buffers[i].elements.as_mut().unwrap();
                if field == 1 {
                    e.c_rows -= 1;
                } else {
                    e.c_batch -= 1;
                }
            }),
        });
    }
    cases
}

#[test]
fn tampered_plans_are_errors_that_name_the_problem() -> Result<()> {
    let (plan, weights) = built()?;
    let good = plan.encode_to_vec();
    assert!(
        matches!(outcome(&good, &weights), Outcome::Ran),
        "the untampered plan must run"
    );
    let mut report = String::new();
    let mut failures = vec![];
    for c in tamper_cases(&plan, &weights) {
        let (mut p, mut w) = (plan.clone(), weights.clone());
        (c.edit)(&mut p, &mut w);
        let got = outcome_no_panic(&p.encode_to_vec(), &w);
        let (stage, msg) = match &got {
            Ok(Outcome::LoadErr(m)) => (Stage::Load, m),
            Ok(Outcome::RunErr(m)) => (Stage::Run, m),
            Ok(Outcome::Ran) => {
                failures.push(format!("{}: ran without an error", c.name));
                continue;
            }
            Err(panic) => {
                failures.push(format!("{}: panicked: {panic}", c.name));
                continue;
            }
        };
        if stage != c.stage {
            failures.push(format!(
                "{}: failed at {stage:?}, expected {:?}: {msg}",
                c.name, c.stage
            ));
        }
        for n in &c.needles {
            if !msg.contains(n.as_str()) {
                failures.push(format!("{}: message lacks {n:?}: {msg}", c.name));
            }
        }
        assert!(!msg.contains('\n'), "{}: multi-line message: {msg}", c.name);
        report += &format!("{} [{stage:?}]: {msg}\n", c.name);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    insta::assert_snapshot!("tamper_messages", report);
    Ok(())
}

#[test]
fn truncated_plans_are_errors() -> Result<()> {
    let (plan, weights) = built()?;
    let bytes = plan.encode_to_vec();
    let (mut errors, mut sha_only) = (0, 0);
    for len in 0..bytes.len() {
        match outcome_no_panic(&bytes[..len], &weights) {
            Ok(Outcome::LoadErr(_)) => errors += 1,
            // Cutting exactly the trailing source_sha256 field leaves a complete plan: that
            // field is for traceability only.
            Ok(Outcome::Ran) => {
                let mut cut = Plan::decode(&bytes[..len])?;
                assert_ne!(cut.source_sha256, plan.source_sha256);
                cut.source_sha256 = plan.source_sha256.clone();
                assert_eq!(cut, plan, "truncation to {len} bytes ran");
                sha_only += 1;
            }
            other => panic!("truncation to {len} of {} bytes: {other:?}", bytes.len()),
        }
    }
    assert_eq!(sha_only, 1);
    assert_eq!(errors, bytes.len() - 1);
    let half = LoadedPlan::from_bytes(&bytes[..bytes.len() / 2], &weights, "model.plan")
        .err()
        .context("half a plan loaded")?;
    assert!(half.to_string().contains("not a valid ngpt plan"), "{half}");
    assert!(LoadedPlan::from_bytes(&[], &weights, "model.plan").is_err());
    Ok(())
}

/// splitmix64: a seeded stream of numbers for the corruption tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Bit flips and byte overwrites: 7000 single-byte flips over the whole plan (every byte is
/// structure: config, kernel module, weights, buffers, steps, arguments; a plan carries no
/// kernel text) and 3000 overwrites of 2 to 8 random bytes. No panic; a plan that still
/// loads must also run or fail cleanly.
#[test]
fn bit_flips_never_panic() -> Result<()> {
    let (plan, weights) = built()?;
    let full = plan.encode_to_vec();
    assert!(matches!(outcome(&full, &weights), Outcome::Ran));
    // NGPT_PLAN_FLIPS=N multiplies the counts, for a longer run.
    let scale: usize = std::env::var("NGPT_PLAN_FLIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut rng = Rng(0x6e67_7074);
    let mut panics = vec![];
    let mut summary = String::new();
    for (set, base, count, multi) in [
        ("single-byte flips", &full, 7000, false),
        ("2-8 byte overwrites", &full, 3000, true),
    ] {
        let count = count * scale;
        let (mut load_err, mut run_err, mut ran) = (0, 0, 0);
        for i in 0..count {
            let mut b = base.clone();
            let mut what = vec![];
            let n = if multi { 2 + rng.below(7) } else { 1 };
            for _ in 0..n {
                let at = rng.below(b.len());
                let old = b[at];
                b[at] = if multi {
                    rng.next() as u8
                } else {
                    old ^ (1 + rng.below(255)) as u8
                };
                what.push(format!("[{at}] {old:#04x}->{:#04x}", b[at]));
            }
            match outcome_no_panic(&b, &weights) {
                Ok(Outcome::LoadErr(_)) => load_err += 1,
                Ok(Outcome::RunErr(_)) => run_err += 1,
                Ok(Outcome::Ran) => ran += 1,
                Err(p) => panics.push(format!("{set} #{i} {}: {p}", what.join(" "))),
            }
        }
        summary += &format!(
            "{set} ({} bytes): {count} cases, {load_err} refused at load, {run_err} refused at run, {ran} ran\n",
            base.len()
        );
    }
    eprintln!("{summary}");
    assert!(
        panics.is_empty(),
        "{} panics:\n{}",
        panics.len(),
        panics.join("\n")
    );
    Ok(())
}

#[test]
fn flipped_weight_bytes_load_and_run() -> Result<()> {
    // model.weights holds raw numbers: any bytes load, and NaN or Inf logits are numbers
    // too; nothing may panic.
    let (plan, weights) = built()?;
    let bytes = plan.encode_to_vec();
    let mut rng = Rng(17);
    for i in 0..200 {
        let mut w = weights.clone();
        let at = rng.below(w.len());
        w[at] ^= 0x7f;
        match outcome_no_panic(&bytes, &w) {
            Ok(Outcome::Ran) => {}
            other => panic!("weights flip #{i} at {at}: {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn requests_beyond_the_plan_are_errors() -> Result<()> {
    let (plan, weights) = built()?;
    let p = Arc::new(LoadedPlan::from_bytes(
        &plan.encode_to_vec(),
        &weights,
        "model.plan",
    )?);
    let err = |r: ngpt_runtime::Result<Vec<f32>>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    let mut report = String::new();
    let mut note = |what: &str, msg: String| report += &format!("{what}: {msg}\n");
    match Session::new(Arc::clone(&p), 0) {
        Ok(_) => panic!("batch 0 accepted"),
        Err(e) => note("batch 0", e.to_string()),
    }
    let mut s = Session::new(Arc::clone(&p), 1)?;
    note("decode before prefill", err(s.decode(&[1])));
    note("token id = vocab", err(s.prefill(&[vec![1, 16]])));
    note("empty prompt", err(s.prefill(&[vec![]])));
    note(
        "two prompts for batch 1",
        err(s.prefill(&[vec![1], vec![2]])),
    );
    note(
        "prompt beyond the KV capacity",
        err(s.prefill(&[vec![1; 33]])),
    );
    s.prefill(&[vec![1; 30]])?;
    s.decode(&[2])?;
    s.decode(&[3])?;
    assert_eq!(s.lens(), [32]);
    note("decode into a full cache", err(s.decode(&[4])));
    note("two tokens for batch 1", err(s.decode(&[4, 5])));
    // The session is still usable: a new prefill restarts the cache.
    s.prefill(&[vec![1, 2, 3]])?;
    assert_eq!(s.decode(&[4])?.len(), 16);
    insta::assert_snapshot!("request_errors", report);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Part 2: the binary.
// ---------------------------------------------------------------------------------------

fn no_panic(o: &Output, what: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "{what}: exited 0; stderr: {err}");
    assert!(
        o.status.code().is_some(),
        "{what}: killed by a signal (abort?): {err}"
    );
    assert_ne!(o.status.code(), Some(101), "{what}: panicked: {err}");
    assert!(!err.contains("panicked"), "{what}: panic text: {err}");
    assert!(!err.contains("stack backtrace"), "{what}: backtrace: {err}");
}

/// Non-zero exit, no panic, and stderr exactly one line starting with `error: `.
fn clean_failure(o: &Output, what: &str) -> String {
    no_panic(o, what);
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: stderr is not one line: {err}");
    assert!(lines[0].starts_with("error: "), "{what}: {err}");
    lines[0].to_string()
}

/// An argument clap refuses: exit 2 and one `error:` line (the CLI drops clap's usage block).
fn usage_failure(o: &Output, what: &str) -> String {
    no_panic(o, what);
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{what}: {err}");
    let errors: Vec<&str> = err.lines().collect();
    assert_eq!(errors.len(), 1, "{what}: stderr is not one line: {err}");
    assert!(err.starts_with("error: "), "{what}: {err}");
    errors[0].to_string()
}

/// The last line of stdout, parsed as JSON.
fn last_json(o: &Output) -> Result<serde_json::Value> {
    let out = stdout(o);
    let last = out.lines().last().context("no stdout")?;
    serde_json::from_str(last).with_context(|| format!("last line is not JSON: {last}"))
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|t| t.as_u64().unwrap_or_else(|| panic!("not an id: {t}")) as u32)
        .collect()
}

fn list(tokens: &[u32]) -> String {
    tokens
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// `ngpt compile INPUT -o DIR` plus `extra`.
fn compile_to(input: &Path, dir: &Path, extra: &[&str]) -> Result<()> {
    let mut args = vec!["compile", utf8(input), "-o", utf8(dir)];
    args.extend_from_slice(extra);
    ok(ngpt(&args)?, "compile")?;
    Ok(())
}

#[test]
fn plan_show_lists_a_tiny_model() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = tmp.path().join("m");
    let args = [
        "init", "--layers", "1", "--heads", "2", "--embd", "8", "--vocab", "16", "--block", "16",
        "--seed", "7",
    ];
    let mut init_args = args.to_vec();
    init_args.insert(1, utf8(&model));
    ok(ngpt(&init_args)?, "init")?;
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    compile_to(&model, &a, &[])?;
    compile_to(&model, &b, &[])?;
    // Same checkpoint, byte-identical plan and weights.
    for f in ["model.plan", "model.weights"] {
        assert!(
            std::fs::read(a.join(f))? == std::fs::read(b.join(f))?,
            "{f} differs between two compiles"
        );
    }
    let show = |dir: &Path| -> Result<String> {
        let o = ok(
            ngpt(&[
                "plan",
                "show",
                utf8(dir),
                "--tokens",
                "16",
                "--context",
                "15",
            ])?,
            "plan show",
        )?;
        assert!(stderr(&o).is_empty(), "{}", stderr(&o));
        Ok(stdout(&o))
    };
    let text = show(&a)?;
    assert_eq!(text, show(&b)?, "the listing depends on the directory");
    let tmp_s = tmp.path().display().to_string();
    assert!(!text.contains(&tmp_s) && !text.contains('/'), "{text}");
    for needle in [
        "program prefill (batch 1 x 16 tokens; rows R = 16)",
        "program decode (batch 1, 15 tokens in cache; rows R = 1)",
        "attention_prefill",
        "attention_decode",
        "total: 12 steps",
    ] {
        assert!(text.contains(needle), "lacks {needle:?}:\n{text}");
    }
    let version = format!("ngpt {}", env!("CARGO_PKG_VERSION"));
    insta::assert_snapshot!("plan_show_tiny", text.replace(&version, "ngpt <VERSION>"));

    // A reader that stops before the listing (`ngpt plan show DIR | head`; here the pipe's
    // read end is closed before the process starts, so its first write fails whatever the
    // scheduling: closing it after spawn raced the child, which could write the whole listing
    // into the pipe's buffer first and exit 0): the process ends quietly, as other Unix tools
    // do, not with a panic from the write to a closed stdout.
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let o = std::process::Command::new(ngpt_bin())
        .args(["plan", "show", utf8(&a)])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()?;
    assert!(
        stderr(&o).is_empty(),
        "plan show into a closed pipe: {}",
        stderr(&o)
    );
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(o.status.signal(), Some(libc::SIGPIPE), "{:?}", o.status);
    }

    // A directory with no plan, and a truncated plan: one-line errors naming the file.
    let o = ngpt(&["plan", "show", utf8(&model)])?;
    let err = clean_failure(&o, "plan show of a checkpoint");
    assert!(err.contains("model.plan"), "{err}");
    let plan = std::fs::read(a.join("model.plan"))?;
    std::fs::write(a.join("model.plan"), &plan[..plan.len() / 3])?;
    let o = ngpt(&["plan", "show", utf8(&a)])?;
    let err = clean_failure(&o, "plan show of a truncated plan");
    assert!(
        err.contains("model.plan") && err.contains("not a valid ngpt plan"),
        "{err}"
    );
    Ok(())
}

#[test]
fn generate_greedy_reproduces_nvidia() -> Result<()> {
    let greedy = fixture_json("greedy.json")?;
    let prompt = fixture_tokens("greedy.json", "prompt_tokens")?;
    let want = fixture_tokens("greedy.json", "greedy_tokens")?;
    let want_text = greedy["greedy_text"].as_str().context("greedy_text")?;
    let tmp = tempfile::tempdir()?;
    let compiled = tmp.path().join("c");
    compile_to(&nv_tiny().join("ckpt.pt"), &compiled, &[])?;
    // The fixture directory (a plan lowered in memory) and a compiled directory.
    for input in [nv_tiny(), compiled] {
        let o = ok(
            ngpt(&[
                "generate",
                utf8(&input),
                "--tokens",
                &list(&prompt),
                "--max-new-tokens",
                "40",
                "--json",
            ])?,
            "generate",
        )?;
        let j = last_json(&o)?;
        assert_eq!(ids(&j["tokens"]), want, "{}", input.display());
        assert_eq!(j["text"].as_str(), Some(want_text), "{}", input.display());
        for rate in ["prefill_tokens_per_s", "decode_tokens_per_s"] {
            let r = j[rate].as_f64().context(rate)?;
            assert!(r.is_finite() && r > 0.0, "{rate} = {r}");
        }
    }
    Ok(())
}

#[test]
fn generate_streams_prompt_text() -> Result<()> {
    let input = nv_tiny().join("ckpt.pt");
    let prompt = "Permission is ";
    let run = |json: bool| -> Result<Output> {
        let mut args = vec![
            "generate",
            utf8(&input),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "24",
        ];
        if json {
            args.push("--json");
        }
        ok(ngpt(&args)?, "generate --prompt")
    };
    let streamed = run(false)?;
    let j = last_json(&run(true)?)?;
    let text = j["text"].as_str().context("text")?;
    assert_eq!(text.chars().count(), 24);
    // The prompt, then the generated text, then a newline; rates on stderr.
    assert_eq!(stdout(&streamed), format!("{prompt}{text}\n"));
    assert!(
        stderr(&streamed).contains("tokens/s"),
        "{}",
        stderr(&streamed)
    );
    Ok(())
}

#[test]
fn generate_batches_and_prompt_files() -> Result<()> {
    let input = nv_tiny().join("ckpt.pt");
    let prompt = fixture_tokens("greedy.json", "prompt_tokens")?;
    let want = fixture_tokens("greedy.json", "greedy_tokens")?;
    let o = ok(
        ngpt(&[
            "generate",
            utf8(&input),
            "--tokens",
            &list(&prompt),
            "--max-new-tokens",
            "40",
            "--batch",
            "2",
            "--json",
        ])?,
        "generate --batch 2",
    )?;
    let j = last_json(&o)?;
    let seqs = j["tokens"].as_array().context("tokens")?;
    assert_eq!(seqs.len(), 2, "{j}");
    for s in seqs {
        assert_eq!(ids(s), want);
    }
    assert_eq!(j["text"].as_array().map(Vec::len), Some(2), "{j}");

    // A ragged --prompts file: each sequence generates what it generates alone.
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("prompts.txt");
    let short = &prompt[..7];
    std::fs::write(&file, format!("{}\n\nPermission is \n", list(short)))?;
    let batch = ok(
        ngpt(&[
            "generate",
            utf8(&input),
            "--prompts",
            utf8(&file),
            "--max-new-tokens",
            "12",
            "--json",
        ])?,
        "generate --prompts",
    )?;
    let got = last_json(&batch)?["tokens"].clone();
    let got = got.as_array().context("tokens")?;
    assert_eq!(got.len(), 2);
    for (i, alone) in [
        vec!["--tokens".to_string(), list(short)],
        vec!["--prompt".to_string(), "Permission is ".to_string()],
    ]
    .iter()
    .enumerate()
    {
        let mut args = vec!["generate", utf8(&input), "--max-new-tokens", "12", "--json"];
        args.extend(alone.iter().map(String::as_str));
        let one = last_json(&ok(ngpt(&args)?, "generate alone")?)?;
        assert_eq!(ids(&got[i]), ids(&one["tokens"]), "prompt {i}");
    }
    Ok(())
}

#[test]
fn generate_sampling_is_seeded() -> Result<()> {
    let input = nv_tiny().join("ckpt.pt");
    let sample = |seed: u64, top_k: &str| -> Result<Vec<u32>> {
        let o = ok(
            ngpt(&[
                "generate",
                utf8(&input),
                "--prompt",
                "Permission is ",
                "--max-new-tokens",
                "40",
                "--temperature",
                "1.0",
                "--top-k",
                top_k,
                "--seed",
                &seed.to_string(),
                "--json",
            ])?,
            "generate with sampling",
        )?;
        Ok(ids(&last_json(&o)?["tokens"]))
    };
    for top_k in ["5", "0"] {
        let first = sample(1, top_k)?;
        assert_eq!(
            first,
            sample(1, top_k)?,
            "top-k {top_k}: same seed, same tokens"
        );
        let mut distinct = std::collections::BTreeSet::new();
        for seed in 1..=4 {
            distinct.insert(sample(seed, top_k)?);
        }
        assert!(
            distinct.len() >= 2,
            "top-k {top_k}: four seeds gave the same 40 tokens"
        );
    }
    Ok(())
}

#[test]
fn generate_bad_arguments_fail_cleanly() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ckpt = nv_tiny().join("ckpt.pt");
    let ckpt = utf8(&ckpt);
    let c32 = tmp.path().join("c32");
    compile_to(Path::new(ckpt), &c32, &["--max-seq-len", "32"])?;
    let c32 = utf8(&c32);
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "\n  \n")?;
    let empty = utf8(&empty);
    let missing = tmp.path().join("missing.txt");
    let missing = utf8(&missing);
    let three = tmp.path().join("three.txt");
    std::fs::write(&three, "1,2\n3\n4,5,6\n")?;
    let three = utf8(&three);
    let long: String = list(&[3; 24]);
    // (what, arguments after `generate`, text the one error line must hold)
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "batch 0",
            vec![ckpt, "--tokens", "1,2", "--batch", "0"],
            "--batch 0",
        ),
        (
            "batch too large for memory",
            vec![
                ckpt,
                "--tokens",
                "1,2",
                "--batch",
                "1000000",
                "--max-new-tokens",
                "2",
            ],
            "cannot allocate",
        ),
        (
            "token id = vocab",
            vec![ckpt, "--tokens", "1,86"],
            "token id 86",
        ),
        (
            "negative token",
            vec![ckpt, "--tokens", "-1"],
            "token id -1",
        ),
        ("empty --tokens", vec![ckpt, "--tokens", ""], "empty"),
        ("malformed --tokens", vec![ckpt, "--tokens", "1,x"], "`x`"),
        (
            "a character outside the vocabulary",
            vec![ckpt, "--prompt", "café"],
            "'é' is not in the vocabulary",
        ),
        (
            "prompt + new tokens beyond --max-seq-len",
            vec![c32, "--tokens", &long, "--max-new-tokens", "9"],
            "exceeds the KV capacity 32",
        ),
        (
            "--max-new-tokens at the largest integer (the sum used to wrap past the check)",
            vec![
                ckpt,
                "--tokens",
                "1,2",
                "--max-new-tokens",
                "18446744073709551615",
            ],
            "exceeds the KV capacity",
        ),
        (
            "--temperature NaN (sampled the last token every step)",
            vec![ckpt, "--tokens", "1", "--temperature", "nan"],
            "--temperature NaN",
        ),
        (
            "--temperature infinite",
            vec![ckpt, "--tokens", "1", "--temperature", "inf"],
            "expected a finite number",
        ),
        (
            "--temperature negative",
            vec![ckpt, "--tokens", "1", "--temperature=-0.5"],
            "--temperature -0.5",
        ),
        (
            "prompt alone beyond --max-seq-len",
            vec![
                c32,
                "--prompt",
                "the the the the the the the the the",
                "--max-new-tokens",
                "1",
            ],
            "KV capacity 32",
        ),
        (
            "--prompts empty file",
            vec![ckpt, "--prompts", empty],
            "holds no prompt",
        ),
        (
            "--prompts missing file",
            vec![ckpt, "--prompts", missing],
            "missing.txt",
        ),
        (
            "--prompts with 3 prompts and --batch 2",
            vec![ckpt, "--prompts", three, "--batch", "2"],
            "--batch 2",
        ),
        ("no prompt at all", vec![ckpt], "give a prompt"),
        (
            "--vocab that does not exist",
            vec![ckpt, "--prompt", "ab", "--vocab", missing],
            "missing.txt",
        ),
    ];
    let mut lines = String::new();
    for (what, args, needle) in cases {
        let mut full = vec!["generate"];
        full.extend(args);
        let o = ngpt(&full)?;
        let err = clean_failure(&o, what);
        assert!(err.contains(needle), "{what}: lacks {needle:?}: {err}");
        lines += &format!("{what}: {err}\n");
    }
    // plan-cuda asked for explicitly: runs where CUDA is usable, else one line saying
    // what is missing (which depends on the machine, so it is not in the snapshot).
    let o = ngpt(&["generate", ckpt, "--tokens", "1", "--engine", "plan-cuda"])?;
    match ngpt_runtime::cuda::unavailable() {
        Some(why) => {
            let err = clean_failure(&o, "plan-cuda");
            assert!(
                err.contains("--engine plan-cuda") && err.contains(&why),
                "{err}"
            );
        }
        None => assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr)),
    }
    // Refused by the argument parser, with its usage lines.
    let usage: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "--tokens and --prompt together",
            vec![ckpt, "--tokens", "1", "--prompt", "ab"],
            "cannot be used with",
        ),
        (
            "unknown engine",
            vec![ckpt, "--tokens", "1", "--engine", "tpu"],
            "tpu",
        ),
        (
            "negative --max-new-tokens",
            vec![ckpt, "--tokens", "1", "--max-new-tokens", "-3"],
            "-3",
        ),
    ];
    for (what, args, needle) in usage {
        let mut full = vec!["generate"];
        full.extend(args);
        let err = usage_failure(&ngpt(&full)?, what);
        assert!(err.contains(needle), "{what}: lacks {needle:?}: {err}");
        lines += &format!("{what}: {err}\n");
    }
    let lines = lines
        .replace(&tmp.path().display().to_string(), "<TMP>")
        .replace(&nv_tiny().display().to_string(), "<FIXTURE>");
    insta::assert_snapshot!("generate_bad_arguments", lines);
    Ok(())
}

/// Logits `[T, vocab]` of `ngpt logits INPUT --engine ENGINE`, as f64.
fn cli_logits(input: &Path, engine: &str, tokens: &str, out: &Path) -> Result<Vec<f64>> {
    ok(
        ngpt(&[
            "logits",
            utf8(input),
            "--engine",
            engine,
            "--tokens",
            tokens,
            "-o",
            utf8(out),
        ])?,
        &format!("logits --engine {engine}"),
    )?;
    Ok(read_npy(out)?.2)
}

#[test]
fn logits_plan_cpu_matches_the_reference() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("c");
    compile_to(&nv_tiny().join("ckpt.pt"), &dir, &[])?;
    let tokens = list(&fixture_tokens("prompt.json", "tokens")?);
    let plan = cli_logits(&dir, "plan-cpu", &tokens, &tmp.path().join("plan.npy"))?;
    let want = cli_logits(&dir, "reference", &tokens, &tmp.path().join("ref.npy"))?;
    let c = compare(&plan, &want, 86);
    assert!(c.passes(1e-5, 1.0), "{c:?}");
    Ok(())
}

#[test]
fn a_loaded_plan_reads_its_weights_in_place_and_survives_a_recompile() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("c");
    let ckpt = nv_tiny().join("ckpt.pt");
    compile_to(&ckpt, &dir, &["--max-seq-len", "64", "--dtype", "bf16"])?;
    let plan_bytes = std::fs::read(dir.join("model.plan"))?;
    let weight_bytes = std::fs::read(dir.join("model.weights"))?;
    let copied = LoadedPlan::from_bytes(&plan_bytes, &weight_bytes, "model.plan")?;
    let mapped = Arc::new(LoadedPlan::load(&dir)?);
    // Every weight is viewed in place in the mapped file (the compiler aligns each to 256
    // bytes), with exactly the values of a copy.
    assert_eq!(mapped.weights().len(), copied.weights().len());
    let names = || mapped.plan().weights.iter().map(|w| &w.name);
    let pairs = || names().zip(mapped.weights().iter().zip(copied.weights()));
    for (name, (a, b)) in pairs() {
        let in_place = match a {
            ngpt_runtime::plan::WeightData::F32(v) => v.is_in_place(),
            ngpt_runtime::plan::WeightData::Bf16(v) | ngpt_runtime::plan::WeightData::F16(v) => {
                v.is_in_place()
            }
            ngpt_runtime::plan::WeightData::Quant(q) => {
                q.data.is_in_place() && q.scales.is_in_place()
            }
        };
        assert_eq!(in_place, cfg!(target_endian = "little"), "{name}");
        assert_eq!(a, b, "{name}");
    }
    // Read instead (`NGPT_MMAP=0`): the same values, in the process's own buffer.
    let read = LoadedPlan::load_with(&dir, ngpt_runtime::plan::WeightsIo::Read)?;
    assert!(read.weights() == copied.weights());
    let tokens: [u32; 4] = [45, 64, 77, 12];
    let before = Session::new(mapped.clone(), 1)?.prefill(&[tokens.to_vec()])?;
    // `compile --force` over the same directory (another dtype, so other bytes) replaces the
    // files by rename: the loaded plan keeps reading the old ones and computes the same bits.
    compile_to(&ckpt, &dir, &["--max-seq-len", "64", "--force"])?;
    assert_ne!(std::fs::read(dir.join("model.weights"))?, weight_bytes);
    for (name, (a, b)) in pairs() {
        assert_eq!(a, b, "{name} changed under the loaded plan");
    }
    let after = Session::new(mapped.clone(), 1)?.prefill(&[tokens.to_vec()])?;
    assert!(before.iter().all(|x| x.is_finite()));
    assert_eq!(
        before.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        after.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    Ok(())
}

#[test]
fn bf16_plans_halve_the_matrices_and_stay_close() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ckpt = nv_tiny().join("ckpt.pt");
    let (f32_dir, bf16_dir) = (tmp.path().join("f32"), tmp.path().join("bf16"));
    compile_to(&ckpt, &f32_dir, &["--max-seq-len", "64"])?;
    compile_to(
        &ckpt,
        &bf16_dir,
        &["--max-seq-len", "64", "--dtype", "bf16"],
    )?;
    let read =
        |d: &Path| -> Result<Plan> { Ok(Plan::decode(&*std::fs::read(d.join("model.plan"))?)?) };
    let (pf, pb16) = (read(&f32_dir)?, read(&bf16_dir)?);
    assert_eq!(pb16.weight_dtype, pb::DType::Bf16 as i32);
    // The GEMM matrices are stored in half the bytes; vectors and tables stay F32.
    let (mut matrices_f32, mut matrices_bf16) = (0u64, 0u64);
    for (a, b) in pf.weights.iter().zip(&pb16.weights) {
        assert_eq!((&a.name, &a.shape), (&b.name, &b.shape));
        if b.dtype == pb::DType::Bf16 as i32 {
            assert_eq!(a.shape.len(), 2, "{}", a.name);
            assert_eq!(b.bytes * 2, a.bytes, "{}", a.name);
            matrices_f32 += a.bytes;
            matrices_bf16 += b.bytes;
        } else {
            assert_eq!(b.bytes, a.bytes, "{}", a.name);
        }
    }
    // Loaded, the matrices stay bf16 (half the memory), and no step reads one of them as
    // f32 (the embedding table `embed` reads is stored f32), so the executors widen none.
    let loaded = ngpt_runtime::plan::LoadedPlan::load(&bf16_dir)?;
    let mut bf16_loaded = 0;
    for (w, data) in loaded.plan().weights.iter().zip(loaded.weights()) {
        let is_bf16 = matches!(data, ngpt_runtime::plan::WeightData::Bf16(_));
        assert_eq!(is_bf16, w.dtype == pb::DType::Bf16 as i32, "{}", w.name);
        bf16_loaded += is_bf16 as usize;
    }
    assert_eq!(bf16_loaded, 9);
    let reads: Vec<&str> = loaded
        .f32_weight_reads()
        .into_iter()
        .filter(|&i| loaded.plan().weights[i].dtype == pb::DType::Bf16 as i32)
        .map(|i| loaded.plan().weights[i].name.as_str())
        .collect();
    assert!(reads.is_empty(), "bf16 weights read as f32: {reads:?}");
    // The block matrices (4 per layer, 2 layers) and lm_head.
    assert_eq!(
        pb16.weights
            .iter()
            .filter(|w| w.dtype == pb::DType::Bf16 as i32)
            .count(),
        9
    );
    let (size_f32, size_bf16) = (
        std::fs::metadata(f32_dir.join("model.weights"))?.len(),
        std::fs::metadata(bf16_dir.join("model.weights"))?.len(),
    );
    let ratio = size_bf16 as f64 / size_f32 as f64;
    assert!(
        (0.5..0.6).contains(&ratio),
        "{size_bf16} / {size_f32} = {ratio}"
    );
    assert!(matrices_f32 > 0 && matrices_bf16 * 2 == matrices_f32);

    let tokens = list(&fixture_tokens("prompt.json", "tokens")?);
    let got = cli_logits(&bf16_dir, "plan-cpu", &tokens, &tmp.path().join("bf16.npy"))?;
    let want = cli_logits(&bf16_dir, "reference", &tokens, &tmp.path().join("ref.npy"))?;
    let c = compare(&got, &want, 86);
    assert!(c.passes(2e-2, 0.95), "{c:?}");
    Ok(())
}

/// A plan lowered in memory loads without being encoded and decoded again
/// (`LoadedPlan::from_plan`): the same checks (a tampered module is refused alike) and the
/// same logits as through its bytes.
#[test]
fn a_plan_in_memory_loads_without_a_round_trip_through_bytes() -> Result<()> {
    let (plan, weights) = built()?;
    let direct = Arc::new(LoadedPlan::from_plan(
        plan.clone(),
        weights.clone(),
        "in memory",
    )?);
    let via_bytes = Arc::new(LoadedPlan::from_bytes(
        &plan.encode_to_vec(),
        &weights,
        "model.plan",
    )?);
    assert_eq!(direct.plan(), via_bytes.plan());
    assert!(direct.weights() == via_bytes.weights());
    let prompt = vec![vec![1, 2, 3, 4, 5]];
    assert_eq!(
        Session::new(direct, 1)?.prefill(&prompt)?,
        Session::new(via_bytes, 1)?.prefill(&prompt)?
    );
    let mut tampered = plan;
    tampered.modules[0].source = "__global__ void x() {}".into();
    let e = LoadedPlan::from_plan(tampered, weights, "in memory")
        .err()
        .context("a plan with kernel text loaded")?
        .to_string();
    assert!(e.contains("never carries code"), "{e}");
    Ok(())
}
