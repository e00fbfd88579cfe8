//! The scheduler against a fake executor whose logits are a function of a row's whole
//! prefix in its slot's cache: a row that reads a stale, missing or foreign key changes
//! its logits, so "same tokens alone and amid traffic" checks the scheduling itself.

use std::sync::{Arc, Mutex};

use super::*;

const VOCAB: usize = 61;
/// A prompt token that makes the fake executor fail the call holding it.
const FAIL: u32 = 60;

struct Fake {
    slots: usize,
    capacity: usize,
    cache: Vec<Vec<Option<u32>>>,
    calls: Arc<Mutex<Vec<(bool, usize)>>>,
}

impl Fake {
    fn new(slots: usize, capacity: usize) -> Fake {
        Fake {
            slots,
            capacity,
            cache: vec![vec![None; capacity]; slots],
            calls: Arc::default(),
        }
    }
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Backend for Fake {
    fn vocab(&self) -> usize {
        VOCAB
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
    fn slots(&self) -> usize {
        self.slots
    }
    fn describe(&self) -> String {
        "fake".into()
    }
    fn mixes_rows(&self) -> bool {
        true
    }
    fn run(&mut self, decode: bool, rows: &StepRows, chosen: &[usize]) -> Result<Vec<f32>> {
        self.calls.lock().expect("lock").push((decode, rows.len()));
        if rows.tokens.contains(&(FAIL as i32)) {
            return Err(Error::Step {
                step: "fake".into(),
                problem: "the failing token".into(),
            });
        }
        let mut seen = std::collections::HashSet::new();
        for r in 0..rows.len() {
            let (s, p) = (rows.slots[r] as usize, rows.positions[r] as usize);
            assert!(
                seen.insert((s, p)),
                "(slot {s}, position {p}) twice in a call"
            );
            self.cache[s][p] = Some(rows.tokens[r] as u32);
        }
        let mut out = vec![];
        for &r in chosen {
            let (s, p) = (rows.slots[r] as usize, rows.positions[r] as usize);
            let mut h = 0u64;
            for k in &self.cache[s][..=p] {
                h = mix(h ^ u64::from(k.expect("every key up to the row's position written")));
            }
            // The failing token is never sampled.
            out.extend((0..VOCAB as u64).map(|v| match v as u32 {
                FAIL => -1e9,
                _ => (mix(h ^ v) % 1000) as f32 / 125.0 - 4.0,
            }));
        }
        Ok(out)
    }
}

type Log = Arc<Mutex<Vec<Event>>>;

fn sink(log: &Log) -> Sink {
    let log = Arc::clone(log);
    Box::new(move |e| {
        log.lock().expect("lock").push(e);
        true
    })
}

fn tokens(log: &Log) -> Vec<u32> {
    log.lock()
        .expect("lock")
        .iter()
        .filter_map(|e| match e {
            Event::Token(g) => Some(g.token),
            _ => None,
        })
        .collect()
}

fn finish(log: &Log) -> Option<(Finish, usize, usize)> {
    log.lock().expect("lock").iter().find_map(|e| match e {
        Event::Finished {
            reason,
            prompt_tokens,
            completion_tokens,
        } => Some((*reason, *prompt_tokens, *completion_tokens)),
        _ => None,
    })
}

fn request(i: usize) -> Request {
    let len = [1, 3, 17, 40, 16, 33, 2, 5][i % 8];
    Request {
        prompt: (0..len).map(|k| ((i * 7 + k * 3) % 59) as u32).collect(),
        params: SamplingParams {
            max_tokens: [1, 5, 9, 3, 12, 7][i % 6],
            temperature: if i.is_multiple_of(3) { 0.0 } else { 0.9 },
            top_k: i % 4,
            top_p: if i.is_multiple_of(5) { 0.8 } else { 1.0 },
            seed: i as u64,
            ..SamplingParams::default()
        },
    }
}

fn engine(max_batch: usize, capacity: usize) -> Engine {
    Engine::with_backend(
        Box::new(Fake::new(max_batch, capacity)),
        EngineOptions::new(max_batch),
    )
    .expect("engine")
}

fn alone(req: &Request) -> Vec<u32> {
    let mut e = engine(1, 128);
    let log = Log::default();
    e.submit(req.clone(), sink(&log)).expect("submit");
    while e.step() {}
    tokens(&log)
}

#[test]
fn every_request_gets_its_solo_tokens_amid_traffic() {
    let reqs: Vec<Request> = (0..24).map(request).collect();
    let solo: Vec<Vec<u32>> = reqs.iter().map(alone).collect();
    let mut e = engine(5, 64);
    let logs: Vec<Log> = (0..reqs.len()).map(|_| Log::default()).collect();
    // Requests arrive over time: three before each step.
    let mut next = 0;
    loop {
        for _ in 0..3 {
            if next < reqs.len() {
                e.submit(reqs[next].clone(), sink(&logs[next]))
                    .expect("submit");
                next += 1;
            }
        }
        let more = e.step();
        assert!(e.stats().running <= 5);
        if !more && next == reqs.len() {
            break;
        }
    }
    for (i, log) in logs.iter().enumerate() {
        assert_eq!(tokens(log), solo[i], "request {i}");
        let (reason, p, c) = finish(log).expect("finished");
        assert_eq!(reason, Finish::Length);
        assert_eq!((p, c), (reqs[i].prompt.len(), reqs[i].params.max_tokens));
    }
}

#[test]
fn invariant_calls_stay_within_the_dot_product_rows() {
    let mut e =
        Engine::with_backend(Box::new(Fake::new(40, 64)), EngineOptions::new(40)).expect("engine");
    let calls = {
        // The fake's call log, through a second handle on it.
        let f = Fake::new(40, 64);
        let calls = Arc::clone(&f.calls);
        e.backend = Box::new(f);
        calls
    };
    let logs: Vec<Log> = (0..40).map(|_| Log::default()).collect();
    for (i, log) in logs.iter().enumerate() {
        e.submit(request(i), sink(log)).expect("submit");
    }
    while e.step() {}
    let calls = calls.lock().expect("lock");
    assert!(
        calls.iter().all(|&(_, n)| n <= MAX_INVARIANT_ROWS),
        "{calls:?}"
    );
    assert!(
        calls.iter().any(|&(_, n)| n == MAX_INVARIANT_ROWS),
        "{calls:?}"
    );
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_beside_decode() {
    let mut e = engine(2, 128);
    let (a, b) = (Log::default(), Log::default());
    let short = Request {
        prompt: vec![1, 2],
        params: SamplingParams {
            max_tokens: 20,
            temperature: 0.0,
            ..SamplingParams::default()
        },
    };
    let long = Request {
        prompt: (0..100).map(|k| k % 50).collect(),
        params: SamplingParams {
            max_tokens: 2,
            temperature: 0.0,
            ..SamplingParams::default()
        },
    };
    e.submit(short.clone(), sink(&a)).expect("submit");
    e.step(); // the short prompt's first token
    e.submit(long.clone(), sink(&b)).expect("submit");
    // While the long prompt is prefilled (100 rows, at most 32 a step with 1 decode row),
    // the short one gets a token every step.
    for step in 1..=3 {
        e.step();
        assert_eq!(tokens(&a).len(), 1 + step, "step {step}");
        assert!(tokens(&b).is_empty());
    }
    while e.step() {}
    assert_eq!(tokens(&a), alone(&short));
    assert_eq!(tokens(&b), alone(&long));
}

#[test]
fn stop_tokens_and_eos_end_a_request_without_emitting_it() {
    let req = request(1);
    let solo = alone(&Request {
        params: SamplingParams {
            max_tokens: 6,
            ..req.params.clone()
        },
        ..req.clone()
    });
    let stop_at = solo[2];
    let first = solo.iter().position(|&t| t == stop_at).expect("in it");
    let run = |params: SamplingParams, eos: Vec<u32>| {
        let mut opts = EngineOptions::new(1);
        opts.eos = eos;
        let mut e = Engine::with_backend(Box::new(Fake::new(1, 64)), opts).expect("engine");
        let log = Log::default();
        e.submit(
            Request {
                prompt: req.prompt.clone(),
                params,
            },
            sink(&log),
        )
        .expect("submit");
        while e.step() {}
        (tokens(&log), finish(&log).expect("finished"))
    };
    let base = SamplingParams {
        max_tokens: 6,
        ..req.params.clone()
    };
    let stop_ids = SamplingParams {
        stop_token_ids: vec![stop_at],
        ..base.clone()
    };
    let (t, f) = run(stop_ids, vec![]);
    assert_eq!(t, solo[..first]);
    assert_eq!(f, (Finish::Stop, req.prompt.len(), first));
    let (t, f) = run(base.clone(), vec![stop_at]);
    assert_eq!(t, solo[..first]);
    assert_eq!(f.0, Finish::Stop);
    let ignore = SamplingParams {
        ignore_eos: true,
        ..base
    };
    let (t, f) = run(ignore, vec![stop_at]);
    assert_eq!(t, solo);
    assert_eq!(f.0, Finish::Length);
}

#[test]
fn a_receiver_that_leaves_frees_its_slot_at_once() {
    let mut e = engine(1, 64);
    let left: Log = Log::default();
    let seen = Arc::clone(&left);
    let mut n = 0;
    let long = Request {
        params: SamplingParams {
            max_tokens: 30,
            ..request(2).params
        },
        ..request(2)
    };
    e.submit(
        long,
        Box::new(move |ev| {
            seen.lock().expect("lock").push(ev);
            n += 1;
            n < 3 // gone after the third token
        }),
    )
    .expect("submit");
    let next = Log::default();
    e.submit(request(3), sink(&next)).expect("submit");
    assert_eq!(e.stats().waiting, 2);
    let mut steps = 0;
    while e.stats().running + e.stats().waiting > 1 || steps == 0 {
        e.step();
        steps += 1;
    }
    assert_eq!(tokens(&left).len(), 3);
    assert!(finish(&left).is_none(), "nobody to tell");
    while e.step() {}
    assert_eq!(tokens(&next), alone(&request(3)));
}

#[test]
fn a_failing_call_fails_its_requests_and_the_others_go_on() {
    let mut e = Engine::with_backend(Box::new(Fake::new(3, 64)), {
        let mut o = EngineOptions::new(3);
        o.invariant = false; // one call per group: the failing prompt's call holds only it
        o
    })
    .expect("engine");
    let (ok, bad) = (Log::default(), Log::default());
    e.submit(request(0), sink(&ok)).expect("submit");
    e.step();
    e.submit(
        Request {
            prompt: vec![1, FAIL, 2],
            params: SamplingParams::default(),
        },
        sink(&bad),
    )
    .expect("submit");
    while e.step() {}
    assert!(matches!(
        bad.lock().expect("lock").last(),
        Some(Event::Failed(_))
    ));
    // request(0) generates one token and was done before the failure; run a second one.
    let after = Log::default();
    e.submit(request(4), sink(&after)).expect("submit");
    while e.step() {}
    assert_eq!(tokens(&after), alone(&request(4)));
}

#[test]
fn bad_requests_are_refused_with_their_field() {
    let mut e = engine(1, 20);
    let mut req = request(1);
    let err = |e: &mut Engine, r: Request| e.submit(r, Box::new(|_| true)).expect_err("refused");
    req.prompt.clear();
    assert!(err(&mut e, req).to_string().starts_with("prompt: empty"));
    let mut req = request(1);
    req.prompt[0] = VOCAB as u32;
    assert!(matches!(
        err(&mut e, req),
        Error::TokenOutsideVocabulary {
            token: 61,
            vocab: 61
        }
    ));
    let mut req = request(1);
    req.params.max_tokens = 18; // 3 + 18 > 20
    assert!(matches!(
        err(&mut e, req),
        Error::RequestTooLong {
            prompt: 3,
            max_tokens: 18,
            capacity: 20
        }
    ));
    for (field, edit) in [
        (
            "temperature",
            Box::new(|p: &mut SamplingParams| p.temperature = f32::NAN)
                as Box<dyn Fn(&mut SamplingParams)>,
        ),
        (
            "temperature",
            Box::new(|p: &mut SamplingParams| p.temperature = -1.0),
        ),
        ("top_p", Box::new(|p: &mut SamplingParams| p.top_p = 0.0)),
        ("top_p", Box::new(|p: &mut SamplingParams| p.top_p = 1.5)),
        (
            "max_tokens",
            Box::new(|p: &mut SamplingParams| p.max_tokens = 0),
        ),
        (
            "logprobs",
            Box::new(|p: &mut SamplingParams| p.logprobs = Some(21)),
        ),
    ] {
        let mut req = request(1);
        edit(&mut req.params);
        let msg = err(&mut e, req).to_string();
        assert!(msg.starts_with(&format!("{field}: ")), "{msg}");
    }
    // The queue: max_queue waiting requests, then QueueFull.
    let limit = e.options().max_queue;
    for _ in 0..limit {
        e.submit(request(1), Box::new(|_| true)).expect("queued");
    }
    assert!(matches!(err(&mut e, request(1)), Error::QueueFull { limit: l } if l == limit));
}

#[test]
fn logprobs_come_with_the_tokens_when_asked() {
    let mut e = engine(1, 64);
    let log = Log::default();
    let mut req = request(0);
    req.params.logprobs = Some(3);
    req.params.max_tokens = 4;
    e.submit(req, sink(&log)).expect("submit");
    while e.step() {}
    let events = log.lock().expect("lock");
    let gens: Vec<&Generated> = events
        .iter()
        .filter_map(|e| match e {
            Event::Token(g) => Some(g),
            _ => None,
        })
        .collect();
    assert_eq!(gens.len(), 4);
    for g in gens {
        assert_eq!(g.top.len(), 3);
        // Greedy: the token is the most likely one.
        assert_eq!(g.top[0].0, g.token);
        assert_eq!(g.top[0].1, g.logprob);
        assert!(g.logprob <= 0.0 && g.top[1].1 <= g.top[0].1);
    }
}

#[test]
fn the_handle_serves_threads_and_drains() {
    let h = EngineHandle::spawn(|| {
        Engine::with_backend(Box::new(Fake::new(4, 64)), EngineOptions::new(4))
    })
    .expect("spawn");
    let reqs: Vec<Request> = (0..12).map(request).collect();
    let solo: Vec<Vec<u32>> = reqs.iter().map(alone).collect();
    let rxs: Vec<_> = reqs
        .iter()
        .map(|r| {
            let (tx, rx) = std::sync::mpsc::channel();
            h.submit(r.clone(), Box::new(move |e| tx.send(e).is_ok()))
                .expect("submit");
            rx
        })
        .collect();
    for (i, rx) in rxs.into_iter().enumerate() {
        let got: Vec<u32> = rx
            .iter()
            .filter_map(|e| match e {
                Event::Token(g) => Some(g.token),
                _ => None,
            })
            .collect();
        assert_eq!(got, solo[i], "request {i}");
    }
    assert_eq!(h.stats().running, 0);
    h.drain(std::time::Duration::from_secs(5));
    assert!(matches!(
        h.submit(request(0), Box::new(|_| true)),
        Err(Error::ShuttingDown)
    ));
}

#[test]
fn prompt_rows_fill_the_decode_call_instead_of_adding_one() {
    let f = Fake::new(24, 128);
    let calls = Arc::clone(&f.calls);
    let mut e = Engine::with_backend(Box::new(f), EngineOptions::new(24)).expect("engine");
    let long = |n: usize| Request {
        prompt: (0..n as u32).map(|k| k % 50).collect(),
        params: SamplingParams {
            max_tokens: 60,
            temperature: 0.0,
            ..SamplingParams::default()
        },
    };
    // Twenty sequences decoding, then a 40-token prompt arrives: it is prefilled 12 rows a
    // step (the room the 20 decode rows leave in a 32-row call), one call a step.
    for _ in 0..20 {
        e.submit(long(2), Box::new(|_| true)).expect("submit");
    }
    e.step(); // 20 prompts of 2 rows: 40 rows, two calls
    e.step(); // 20 decode rows
    let arrived = Log::default();
    e.submit(long(40), sink(&arrived)).expect("submit");
    let before = calls.lock().expect("lock").len();
    let mut steps = 0;
    while tokens(&arrived).is_empty() {
        e.step();
        steps += 1;
    }
    let c = calls.lock().expect("lock");
    let new = &c[before..];
    assert_eq!(new.len(), steps, "one call a step: {new:?}");
    assert_eq!(steps, 4, "40 rows, 12 a step: {new:?}");
    assert!(new.iter().all(|&(_, n)| n <= MAX_INVARIANT_ROWS));
}
