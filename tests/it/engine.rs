//! The generation engine on the real CPU executor (issue 22): a request's tokens and
//! logits are the same bits alone and amid other requests admitted and retired at any
//! step, and greedy generation gives NVIDIA's tokens.

use std::sync::{Arc, Mutex};

use anyhow::Result;
use ngpt_compiler::plan::{lower, WeightDtype};
use ngpt_compiler::{compile, import};
use ngpt_runtime::engine::{Engine, EngineOptions, Event, Finish, Request, SamplingParams};
use ngpt_runtime::plan::LoadedPlan;
use ngpt_schemas::prost::Message;

use crate::common::{fixture_tokens, nv_tiny};

fn plan(dtype: WeightDtype) -> Result<Arc<LoadedPlan>> {
    let ckpt = import::load(&nv_tiny().join("ckpt.pt"))?;
    let compiled = compile::compile(&ckpt, &compile::Options::default())?;
    let l = lower(&compiled.graph, &ckpt.config, dtype, 64, "")?;
    Ok(Arc::new(LoadedPlan::from_bytes(
        &l.plan.encode_to_vec(),
        &l.weights,
        "model.plan",
    )?))
}

/// One token a request saw: its id, logprob bits and top-5 (id, logprob bits).
type SeenToken = (u32, u32, Vec<(u32, u32)>);

/// What a request saw: per token its id, logprob bits and top-5 bits; how it ended.
#[derive(Debug, Default, Clone, PartialEq)]
struct Seen {
    tokens: Vec<SeenToken>,
    end: Option<(Finish, usize, usize)>,
}

type Log = Arc<Mutex<Seen>>;

fn submit(e: &mut Engine, req: Request) -> Result<Log> {
    let log = Log::default();
    let sink = Arc::clone(&log);
    e.submit(
        req,
        Box::new(move |ev| {
            let mut s = sink.lock().expect("lock");
            match ev {
                Event::Token(g) => s.tokens.push((
                    g.token,
                    g.logprob.to_bits(),
                    g.top.iter().map(|t| (t.0, t.1.to_bits())).collect(),
                )),
                Event::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                } => s.end = Some((reason, prompt_tokens, completion_tokens)),
                Event::Failed(err) => panic!("request failed: {err}"),
            }
            true
        }),
    )?;
    Ok(log)
}

fn requests() -> Result<Vec<Request>> {
    let text = fixture_tokens("prompt.json", "tokens")?;
    // Prompts of 1 to 40 tokens: one chunk, several chunks, a chunk and a tail.
    let lens = [1, 7, 16, 17, 40, 3, 33, 5, 12, 24];
    Ok(lens
        .iter()
        .enumerate()
        .map(|(i, &n)| Request {
            prompt: text[i..i + n].to_vec(),
            params: SamplingParams {
                max_tokens: [3, 9, 14, 1, 20][i % 5],
                temperature: if i % 2 == 0 { 0.0 } else { 0.8 },
                top_k: [0, 5][i % 2],
                top_p: [1.0, 0.9, 1.0][i % 3],
                seed: 100 + i as u64,
                logprobs: Some(5),
                ..SamplingParams::default()
            },
        })
        .collect())
}

fn seen(log: &Log) -> Seen {
    log.lock().expect("lock").clone()
}

#[test]
fn a_request_gets_the_same_bits_alone_and_amid_traffic() -> Result<()> {
    for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
        let plan = plan(dtype)?;
        let reqs = requests()?;
        let solo: Vec<Seen> = reqs
            .iter()
            .map(|r| -> Result<Seen> {
                let mut e = Engine::cpu(Arc::clone(&plan), EngineOptions::new(1))?;
                let log = submit(&mut e, r.clone())?;
                while e.step() {}
                Ok(seen(&log))
            })
            .collect::<Result<_>>()?;
        // Four slots, two arrivals before each step: requests are admitted while others
        // prefill and decode, and take the slots of the ones that finished.
        let mut e = Engine::cpu(Arc::clone(&plan), EngineOptions::new(4))?;
        let mut logs = vec![];
        let mut pending = reqs.iter();
        loop {
            for r in pending.by_ref().take(2) {
                logs.push(submit(&mut e, r.clone())?);
            }
            if !e.step() && logs.len() == reqs.len() {
                break;
            }
        }
        for (i, (log, want)) in logs.iter().zip(&solo).enumerate() {
            let got = seen(log);
            assert_eq!(got.end, want.end, "{dtype:?}: request {i} ended otherwise");
            assert!(
                got == *want,
                "{dtype:?}: request {i}'s tokens or logprob bits differ alone and amid traffic"
            );
            assert_eq!(
                want.end,
                Some((
                    Finish::Length,
                    reqs[i].prompt.len(),
                    reqs[i].params.max_tokens
                ))
            );
        }
    }
    Ok(())
}

#[test]
fn greedy_generation_gives_nvidias_tokens() -> Result<()> {
    let prompt = fixture_tokens("greedy.json", "prompt_tokens")?;
    let want = fixture_tokens("greedy.json", "greedy_tokens")?;
    for invariant in [true, false] {
        let mut opts = EngineOptions::new(2);
        opts.invariant = invariant;
        let mut e = Engine::cpu(plan(WeightDtype::F32)?, opts)?;
        let params = SamplingParams {
            max_tokens: want.len(),
            temperature: 0.0,
            ..SamplingParams::default()
        };
        let log = submit(
            &mut e,
            Request {
                prompt: prompt.clone(),
                params,
            },
        )?;
        while e.step() {}
        let got: Vec<u32> = seen(&log).tokens.iter().map(|t| t.0).collect();
        assert_eq!(got, want, "invariant {invariant}");
    }
    Ok(())
}
