//! `ngpt bench`: prefill and decode speed of one engine, against the machine's floors.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use ngpt_runtime::bench::{gemm_rate, memory_bandwidth, peak_rss_bytes};
use ngpt_runtime::listing::{prefill_last_flops, program_cost, Shape};

use crate::engines::{Engine, Model};

/// Measure prefill and decode (KV cache) speed, time to first token and peak memory, with
/// the floors: the bytes a decode step must move over the measured memory bandwidth, and
/// the prefill's FLOPs over the measured GEMM rate.
#[derive(clap::Args)]
#[command(
    after_help = "Medians over --runs runs after one warm-up. The floors are the plan's own cost \
model (`ngpt plan show`): a decode step moves the weights as the plan stores them plus the KV \
cache read, a prefill does the plan's FLOPs with the lm_head for each prompt's last \
position only (generation reads no other; plan-cpu skips the rest); a fraction of 1 would \
mean running at the machine's limit.\n\nExample:\n  ngpt bench out/small --prompt-len 128 --gen-len 64\n  \
ngpt bench out/small --engine tract --json"
)]
pub struct Args {
    /// A compiled directory or a checkpoint.
    input: PathBuf,
    /// plan-cpu, plan-cuda or tract.
    #[arg(long, value_enum, default_value = "plan-cpu")]
    engine: Engine,
    /// Prompt tokens per sequence (pseudo-random ids).
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens generated per sequence after the prompt.
    #[arg(long, default_value_t = 64)]
    gen_len: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed runs (after one warm-up run).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

/// One run's times, in seconds.
struct Times {
    prefill: f64,
    ttft: f64,
    decode: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(a: Args) -> Result<()> {
    if a.batch == 0 || a.prompt_len == 0 || a.gen_len == 0 || a.runs == 0 {
        bail!("--batch, --prompt-len, --gen-len and --runs must each be at least 1");
    }
    // Load time: from here until the engine can take a request (reading or mapping the
    // model, for a checkpoint also import, passes and lowering; building the session).
    let load_start = Instant::now();
    let mut model = Model::open(&a.input);
    let vocab = model.vocab_size()?;
    let Some(total) = a.prompt_len.checked_add(a.gen_len) else {
        bail!(
            "--prompt-len {} plus --gen-len {} is beyond any KV capacity",
            a.prompt_len,
            a.gen_len
        );
    };
    let plan = model.plan(total)?;
    if total > plan.dims().max_seq_len {
        bail!(
            "--prompt-len {} plus --gen-len {} exceeds the plan's KV capacity {} (--max-seq-len at compile time)",
            a.prompt_len,
            a.gen_len,
            plan.dims().max_seq_len
        );
    }
    // The prompts, and for tract (which panics when an allocation fails) its prefill's
    // attention scores, logits and KV cache: refused here when they cannot fit. The plan
    // executors reserve their buffers fallibly and say so themselves.
    let (b, p, d) = (a.batch as f64, a.prompt_len as f64, &plan.dims());
    let tract_sequence = if a.engine == Engine::Tract {
        crate::engines::score_bytes(d.n_head as f64, p, 4.0)
            + p * vocab as f64 * 8.0
            + (2 * d.n_layer * total * d.n_embd) as f64 * 8.0
    } else {
        0.0
    };
    crate::memory::ensure_fits(
        b * (p * 4.0 + 32.0 + tract_sequence),
        &format!("--batch {} of {}-token prompts", a.batch, a.prompt_len),
        if a.engine == Engine::Tract {
            "the prompts, and tract's attention scores, logits and KV cache"
        } else {
            "the prompts"
        },
        "use a smaller --batch",
    )?;
    // Sequence b's prompt is the pseudo-random sequence from position b on: windows of one
    // sequence (made once; the generator is the same whatever its length).
    let tokens = super::validate::pseudo_random_tokens(a.prompt_len + a.batch - 1, vocab);
    let prompts: Vec<Vec<u32>> = tokens.windows(a.prompt_len).map(<[u32]>::to_vec).collect();

    let mut run_once: Box<dyn FnMut() -> Result<Times> + '_> = match a.engine {
        Engine::PlanCpu | Engine::PlanCuda => {
            let mut session = crate::engines::plan_session(a.engine, plan.clone(), a.batch)?;
            let gen = a.gen_len;
            Box::new(move || {
                let t0 = Instant::now();
                // What generation needs: each prompt's last position, `[B, vocab]`.
                let logits = session.prefill_last(&prompts)?;
                let prefill = t0.elapsed().as_secs_f64();
                let mut next: Vec<u32> = logits
                    .chunks(vocab)
                    .map(ngpt_runtime::sample::argmax)
                    .collect();
                let ttft = t0.elapsed().as_secs_f64();
                let t1 = Instant::now();
                for _ in 0..gen {
                    let out = session.decode(&next)?;
                    next = out
                        .chunks(vocab)
                        .map(ngpt_runtime::sample::argmax)
                        .collect();
                }
                Ok(Times {
                    prefill,
                    ttft,
                    decode: t1.elapsed().as_secs_f64(),
                })
            })
        }
        Engine::Tract => {
            let (b, p, gen) = (a.batch, a.prompt_len, a.gen_len);
            let session = model.tract(total)?;
            let ids: Vec<i64> = prompts.iter().flatten().map(|&t| t as i64).collect();
            let positions: Vec<i64> = (0..b).flat_map(|_| 0..p as i64).collect();
            Box::new(move || {
                let t0 = Instant::now();
                let cache = session.empty_cache(b);
                let step = session.run(&ids, &vec![1; b * p], &positions, &cache)?;
                let prefill = t0.elapsed().as_secs_f64();
                let mut next: Vec<i64> = (0..b)
                    .map(|i| {
                        let row = (i * p + p - 1) * vocab;
                        ngpt_runtime::sample::argmax(&step.logits[row..row + vocab]) as i64
                    })
                    .collect();
                let ttft = t0.elapsed().as_secs_f64();
                let t1 = Instant::now();
                let mut cache = step.cache;
                for i in 0..gen {
                    let len = p + i;
                    let pos = vec![len as i64; b];
                    let out = session.run(&next, &vec![1; b * (len + 1)], &pos, &cache)?;
                    next = out
                        .logits
                        .chunks(vocab)
                        .map(|row| ngpt_runtime::sample::argmax(row) as i64)
                        .collect();
                    cache = out.cache;
                }
                Ok(Times {
                    prefill,
                    ttft,
                    decode: t1.elapsed().as_secs_f64(),
                })
            })
        }
        other => bail!(
            "--engine {}: bench times plan-cpu, plan-cuda or tract",
            other.name()
        ),
    };

    let load = load_start.elapsed().as_secs_f64();
    run_once()?; // warm-up: caches, pools, page faults
    let mut times = vec![];
    for _ in 0..a.runs {
        times.push(run_once()?);
    }
    let prefill = median(times.iter().map(|t| t.prefill).collect());
    let ttft = median(times.iter().map(|t| t.ttft).collect());
    let decode = median(times.iter().map(|t| t.decode).collect());

    // The floors, from the plan's cost model and the measured rates of the machine the
    // engine runs on: the GPU's copy bandwidth and cuBLAS bf16 rate for plan-cuda.
    let (bandwidth, rate, rate_name) = if a.engine == Engine::PlanCuda {
        let r = ngpt_runtime::cuda::rates::device_rates(1 << 30, 8192, 3)?;
        (r.bandwidth, r.gemm_bf16, "cuBLAS bf16 GEMM")
    } else {
        (memory_bandwidth(512 << 20, 3), gemm_rate(1024, 3), "GEMM")
    };
    // Bytes and FLOPs of the decode steps: at batch 1 the bytes bound a step; with more rows
    // the same weights serve more products and the FLOPs can bound it instead.
    let (decode_bytes, decode_flops) = (0..a.gen_len)
        .map(|i| {
            program_cost(
                &plan,
                true,
                Shape {
                    batch: a.batch,
                    tokens: 1,
                    context: a.prompt_len + i,
                },
            )
        })
        .fold((0.0, 0.0), |(b, f), (sb, sf)| (b + sb, f + sf));
    // The prefill a generation runs: every position, but lm_head rows only for the last.
    let prefill_flops = prefill_last_flops(
        &plan,
        Shape {
            batch: a.batch,
            tokens: a.prompt_len,
            context: 0,
        },
    );
    let decode_floor = decode_bytes / bandwidth;
    let decode_compute_floor = decode_flops / rate;
    let prefill_floor = prefill_flops / rate;
    let prefill_tps = (a.batch * a.prompt_len) as f64 / prefill;
    let decode_tps = (a.batch * a.gen_len) as f64 / decode;
    let peak = peak_rss_bytes();

    println!(
        "bench {} on {}: batch {}, prompt {} tokens, {} generated, median of {} runs",
        a.engine.name(),
        a.input.display(),
        a.batch,
        a.prompt_len,
        a.gen_len,
        a.runs
    );
    println!(
        "  prefill      {prefill_tps:>10.1} tokens/s  ({:.1} ms; floor {:.1} ms = {:.2} GFLOP at {:.1} GFLOP/s measured {rate_name}: {:.0}% of it)",
        prefill * 1e3,
        prefill_floor * 1e3,
        prefill_flops / 1e9,
        rate / 1e9,
        100.0 * prefill_floor / prefill
    );
    println!(
        "  decode       {decode_tps:>10.1} tokens/s  ({:.2} ms/step; floor {:.2} ms/step = {:.1} MB/step at {:.1} GB/s measured read bandwidth: {:.0}% of it)",
        decode * 1e3 / a.gen_len as f64,
        decode_floor * 1e3 / a.gen_len as f64,
        decode_bytes / a.gen_len as f64 / 1e6,
        bandwidth / 1e9,
        100.0 * decode_floor / decode
    );
    println!(
        "               {:>10}            (compute floor {:.2} ms/step = {:.2} GFLOP/step at the {rate_name} rate: {:.0}% of it)",
        "",
        decode_compute_floor * 1e3 / a.gen_len as f64,
        decode_flops / a.gen_len as f64 / 1e9,
        100.0 * decode_compute_floor / decode
    );
    println!("  first token  {:>10.1} ms", ttft * 1e3);
    println!(
        "  load         {:>10.1} ms (until the engine takes a request)",
        load * 1e3
    );
    if let Some(p) = peak {
        println!(
            "  peak memory  {:>10.1} MiB (resident)",
            p as f64 / (1 << 20) as f64
        );
    }
    if a.json {
        let j = serde_json::json!({
            "engine": a.engine.name(),
            "batch": a.batch,
            "prompt_len": a.prompt_len,
            "gen_len": a.gen_len,
            "prefill_tokens_per_s": prefill_tps,
            "decode_tokens_per_s": decode_tps,
            "ttft_ms": ttft * 1e3,
            "load_ms": load * 1e3,
            "peak_rss_bytes": peak,
            "decode_floor_fraction": decode_floor / decode,
            "decode_compute_floor_fraction": decode_compute_floor / decode,
            "prefill_floor_fraction": prefill_floor / prefill,
            "memory_bandwidth_bytes_per_s": bandwidth,
            "gemm_flops_per_s": rate,
        });
        println!("{j}");
    }
    Ok(())
}
