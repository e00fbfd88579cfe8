//! `ngpt serve` as clients use it: the real binary on 127.0.0.1, port 0, with nv-tiny.
//! Completions equal `ngpt generate`'s tokens (streamed or not, greedy or seeded, alone or
//! amid 32 concurrent streams); every bad input is answered with its status and an OpenAI
//! error object naming the field; a client that hangs up frees its slot; the API key,
//! /v1/models, /health, /metrics and SIGTERM's drain. Every server is killed when its test
//! ends (the guard's Drop), every request has a timeout.

use crate::common::{self, ngpt_bin, nv_tiny, utf8};

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

/// A running `ngpt serve`, killed on drop.
struct Server {
    child: Child,
    addr: String,
    stderr: tempfile::NamedTempFile,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Already gone (a test stopped it) is fine.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `ngpt serve INPUT --port 0 ARGS` and waits until /health says it is ready.
    fn start(input: &std::path::Path, args: &[&str]) -> Result<Server> {
        let stderr = tempfile::NamedTempFile::new()?;
        let mut child = Command::new(ngpt_bin())
            .args(["serve", utf8(input), "--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr.reopen()?))
            .spawn()
            .context("starting ngpt serve")?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Server {
            child,
            addr: String::new(),
            stderr,
        };
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .with_context(|| format!("no address printed; stderr: {}", server.log()))?;
        server.addr = line
            .strip_prefix("listening on ")
            .with_context(|| format!("first stdout line: {line:?}"))?
            .to_string();
        ensure!(server.addr.starts_with("http://127.0.0.1:"), "{line}");
        let t0 = Instant::now();
        loop {
            if let Ok((200, _, _)) = server.get("/health") {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                bail!("ngpt serve exited ({status}): {}", server.log());
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(120),
                "not ready after 120 s: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }

    fn get(&self, path: &str) -> Result<(u16, String, ureq::http::HeaderMap)> {
        request(&self.addr, "GET", path, None, None)
    }

    /// POSTs `body` (JSON text) and returns the status and the body as JSON.
    fn post(&self, path: &str, body: &str) -> Result<(u16, Value, ureq::http::HeaderMap)> {
        let (status, text, headers) = request(&self.addr, "POST", path, Some(body), None)?;
        let v = serde_json::from_str(&text)
            .with_context(|| format!("POST {path}: {status}, not JSON: {text}"))?;
        Ok((status, v, headers))
    }

    /// A non-streamed completion that must succeed.
    fn complete(&self, body: Value) -> Result<Value> {
        let (status, v, _) = self.post("/v1/completions", &body.to_string())?;
        ensure!(status == 200, "{body}: {status} {v}");
        Ok(v)
    }

    /// A gauge or counter of /metrics (the first sample whose line starts with `name`).
    fn metric(&self, name: &str) -> Result<f64> {
        let (_, text, _) = self.get("/metrics")?;
        let line = text
            .lines()
            .find(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' '))
            })
            .with_context(|| format!("{name} not in /metrics:\n{text}"))?;
        Ok(line.rsplit(' ').next().context("a value")?.parse()?)
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> Result<(u16, String, ureq::http::HeaderMap)> {
    let url = format!("{addr}{path}");
    let a = agent();
    let mut resp = match (method, body) {
        ("GET", _) => {
            let mut r = a.get(&url);
            if let Some(k) = key {
                r = r.header("Authorization", &format!("Bearer {k}"));
            }
            r.call()?
        }
        (_, b) => {
            let mut r = a.post(&url).header("Content-Type", "application/json");
            if let Some(k) = key {
                r = r.header("Authorization", &format!("Bearer {k}"));
            }
            r.send(b.unwrap_or(""))?
        }
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()?;
    Ok((status, text, headers))
}

/// What one streamed completion gave.
#[derive(Debug, Default, PartialEq)]
struct Streamed {
    text: String,
    tokens: Vec<u32>,
    finish: Option<String>,
    usage: Option<Value>,
}

/// Reads a `stream: true` answer to its `data: [DONE]`.
fn read_stream(reader: impl Read) -> Result<Streamed> {
    let mut out = Streamed::default();
    let mut done = false;
    for line in BufReader::new(reader).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            ensure!(line.is_empty(), "not an SSE data line: {line:?}");
            continue;
        };
        ensure!(!done, "data after [DONE]: {data}");
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data)?;
        ensure!(v.get("error").is_none(), "error event: {v}");
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            out.usage = Some(u.clone());
        }
        for c in v["choices"].as_array().context("choices")? {
            out.text += c["text"]
                .as_str()
                .or(c["delta"]["content"].as_str())
                .unwrap_or("");
            for t in c["token_ids"].as_array().into_iter().flatten() {
                out.tokens.push(t.as_u64().context("a token id")? as u32);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                out.finish = Some(f.to_string());
            }
        }
    }
    ensure!(done, "the stream ended without data: [DONE]");
    Ok(out)
}

fn stream(addr: &str, path: &str, mut body: Value) -> Result<Streamed> {
    body["stream"] = json!(true);
    body["return_token_ids"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let mut resp = agent()
        .post(&format!("{addr}{path}"))
        .header("Content-Type", "application/json")
        .send(body.to_string())?;
    ensure!(
        resp.status() == 200,
        "{body}: {}",
        resp.body_mut().read_to_string()?
    );
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    ensure!(ct.starts_with("text/event-stream"), "content-type {ct}");
    read_stream(resp.into_body().into_reader())
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_u64())
                .map(|t| t as u32)
                .collect()
        })
        .unwrap_or_default()
}

/// `ngpt generate --json`'s tokens for a prompt of token ids.
fn generate(tokens: &[u32], max_new: usize, sampling: &[&str]) -> Result<Vec<u32>> {
    let list = tokens
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let n = max_new.to_string();
    let model = nv_tiny();
    let mut args = vec![
        "generate",
        utf8(&model),
        "--tokens",
        &list,
        "--max-new-tokens",
        &n,
        "--engine",
        "plan-cpu",
        "--json",
    ];
    args.extend_from_slice(sampling);
    let o = common::ok(common::ngpt(&args)?, "ngpt generate")?;
    let out = common::stdout(&o);
    let v: Value = serde_json::from_str(out.lines().last().context("output")?)?;
    Ok(ids(&v["tokens"]))
}

fn prompt_tokens() -> Result<Vec<u32>> {
    common::fixture_tokens("prompt.json", "tokens")
}

#[test]
fn completions_equal_generate_streamed_or_not() -> Result<()> {
    let s = Server::start(&nv_tiny(), &[])?;
    let prompt = prompt_tokens()?;
    let short = &prompt[..9];
    // Greedy, token ids.
    let want = generate(short, 24, &[])?;
    let body = json!({"model": "nv-tiny", "prompt": short, "max_tokens": 24, "temperature": 0,
        "return_token_ids": true});
    let v = s.complete(body.clone())?;
    assert_eq!(ids(&v["choices"][0]["token_ids"]), want);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 9, "completion_tokens": 24, "total_tokens": 33})
    );
    let st = stream(&s.addr, "/v1/completions", body)?;
    assert_eq!(st.tokens, want);
    assert_eq!(st.text, v["choices"][0]["text"].as_str().unwrap_or("?"));
    assert_eq!(st.finish.as_deref(), Some("length"));
    assert_eq!(
        st.usage.as_ref().map(|u| u["completion_tokens"].clone()),
        Some(json!(24))
    );

    // Seeded sampling.
    let want = generate(
        short,
        20,
        &["--temperature", "0.8", "--top-k", "5", "--seed", "7"],
    )?;
    let body = json!({"prompt": short, "max_tokens": 20, "temperature": 0.8, "top_k": 5,
        "seed": 7, "return_token_ids": true});
    assert_eq!(
        ids(&s.complete(body.clone())?["choices"][0]["token_ids"]),
        want
    );
    assert_eq!(stream(&s.addr, "/v1/completions", body)?.tokens, want);

    // Text in, text out: the char-level vocabulary of nv-tiny, one token per character.
    let v = s.complete(json!({"prompt": "Permission is ", "max_tokens": 12, "temperature": 0}))?;
    let want = generate(&prompt[..14], 12, &[])?;
    let text = v["choices"][0]["text"].as_str().context("text")?;
    assert_eq!(text.chars().count(), want.len());
    assert_eq!(v["usage"]["prompt_tokens"], 14);

    // Logprobs: the chosen token's and the top alternatives, most likely first; greedy
    // picks the most likely.
    let v =
        s.complete(json!({"prompt": short, "max_tokens": 3, "temperature": 0, "logprobs": 2}))?;
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().map(Vec::len), Some(3), "{lp}");
    for (i, top) in lp["top_logprobs"]
        .as_array()
        .context("top")?
        .iter()
        .enumerate()
    {
        let top = top.as_object().context("a map")?;
        assert!(!top.is_empty() && top.len() <= 2, "{top:?}");
        let best = top
            .values()
            .filter_map(Value::as_f64)
            .fold(f64::MIN, f64::max);
        let chosen = lp["token_logprobs"][i].as_f64().context("logprob")?;
        assert!(
            chosen <= 0.0 && (chosen - best).abs() < 1e-5,
            "{chosen} vs {best}"
        );
    }

    // A stop string cuts the text before it, finish_reason stop.
    let full =
        s.complete(json!({"prompt": "Permission is ", "max_tokens": 20, "temperature": 0}))?;
    let full = full["choices"][0]["text"]
        .as_str()
        .context("text")?
        .to_string();
    let stop: String = full.chars().skip(5).take(2).collect();
    let cut = &full[..full.find(&stop).context("stop in text")?];
    let v = s.complete(
        json!({"prompt": "Permission is ", "max_tokens": 20, "temperature": 0, "stop": [stop]}),
    )?;
    assert_eq!(v["choices"][0]["text"], cut);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let mut body =
        json!({"prompt": "Permission is ", "max_tokens": 20, "temperature": 0, "stop": stop});
    body["stream"] = json!(true);
    let st = stream(&s.addr, "/v1/completions", body)?;
    assert_eq!(
        (st.text.as_str(), st.finish.as_deref()),
        (cut, Some("stop"))
    );
    Ok(())
}

#[test]
fn concurrent_streams_equal_their_solo_results() -> Result<()> {
    let s = Server::start(&nv_tiny(), &["--max-batch", "8", "--max-queue", "64"])?;
    let prompt = prompt_tokens()?;
    let cases: Vec<Value> = (0..32)
        .map(|i| {
            let len = 1 + (i * 7) % prompt.len().min(40);
            let mut body = json!({"prompt": &prompt[..len], "max_tokens": 4 + (i * 5) % 29});
            if i % 3 == 0 {
                body["temperature"] = json!(0);
            } else {
                body["temperature"] = json!(0.9);
                body["seed"] = json!(i);
                body["top_p"] = json!(0.95);
            }
            body
        })
        .collect();
    // Alone, one after the other.
    let solo: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| {
            let mut c = c.clone();
            c["return_token_ids"] = json!(true);
            Ok(ids(&s.complete(c)?["choices"][0]["token_ids"]))
        })
        .collect::<Result<_>>()?;
    // All at once.
    let t0 = Instant::now();
    let handles: Vec<_> = cases
        .iter()
        .cloned()
        .map(|c| {
            let addr = s.addr.clone();
            std::thread::spawn(move || stream(&addr, "/v1/completions", c))
        })
        .collect();
    for (i, (h, want)) in handles.into_iter().zip(&solo).enumerate() {
        let got = h
            .join()
            .map_err(|_| anyhow::anyhow!("client {i} panicked"))??;
        assert_eq!(&got.tokens, want, "client {i}: {}", cases[i]);
        assert_eq!(got.finish.as_deref(), Some("length"), "client {i}");
    }
    eprintln!(
        "32 concurrent streams in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(s.metric("ngpt_slots_in_use")?, 0.0);
    assert_eq!(s.metric("ngpt_requests_waiting")?, 0.0);
    Ok(())
}

#[test]
fn a_client_that_hangs_up_frees_its_slot() -> Result<()> {
    let s = Server::start(&nv_tiny(), &["--max-batch", "2"])?;
    let body = json!({"prompt": "Permission is ", "max_tokens": 1500, "stream": true,
        "temperature": 0, "ignore_eos": true});
    let resp = agent()
        .post(&format!("{}/v1/completions", s.addr))
        .send(body.to_string())?;
    let mut reader = BufReader::new(resp.into_body().into_reader());
    let mut line = String::new();
    let mut events = 0;
    while events < 3 {
        line.clear();
        ensure!(reader.read_line(&mut line)? > 0, "stream ended early");
        if line.starts_with("data: ") {
            events += 1;
        }
    }
    assert_eq!(s.metric("ngpt_slots_in_use")?, 1.0);
    drop(reader);
    let t0 = Instant::now();
    while s.metric("ngpt_slots_in_use")? != 0.0 {
        ensure!(t0.elapsed() < Duration::from_secs(20), "slot still held");
        std::thread::sleep(Duration::from_millis(20));
    }
    let t0 = Instant::now();
    while s
        .metric(r#"ngpt_requests_finished_total{reason="cancelled"}"#)
        .unwrap_or(0.0)
        != 1.0
    {
        ensure!(
            t0.elapsed() < Duration::from_secs(20),
            "not counted as cancelled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The server goes on serving.
    let v = s.complete(json!({"prompt": [5, 6], "max_tokens": 2}))?;
    assert_eq!(v["usage"]["completion_tokens"], 2);
    Ok(())
}

/// Asserts an OpenAI error object with `status` whose param is `param`.
fn assert_error(
    s: &Server,
    path: &str,
    body: &str,
    status: u16,
    param: Option<&str>,
) -> Result<()> {
    let (got, v, _) = s.post(path, body)?;
    assert_eq!(got, status, "{body}: {v}");
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("code").is_some(), "{v}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{body}: {v}");
        assert!(
            e["message"]
                .as_str()
                .unwrap_or("")
                .contains(p.split('[').next().unwrap_or(p)),
            "the message names {p}: {v}"
        );
    }
    Ok(())
}

#[test]
fn bad_inputs_are_answered_with_openai_errors() -> Result<()> {
    let s = Server::start(&nv_tiny(), &["--max-body-bytes", "65536"])?;
    let c = "/v1/completions";
    for (body, status, param) in [
        (json!({"prompt": "ab", "max_tokens": 0}), 400, "max_tokens"),
        (
            json!({"prompt": "ab", "max_tokens": "ten"}),
            400,
            "max_tokens",
        ),
        (
            json!({"prompt": "ab", "max_tokens": 2049}),
            400,
            "max_tokens",
        ),
        (
            json!({"prompt": "ab", "temperature": -1}),
            400,
            "temperature",
        ),
        (
            json!({"prompt": "ab", "temperature": "warm"}),
            400,
            "temperature",
        ),
        (json!({"prompt": "ab", "top_p": 0}), 400, "top_p"),
        (json!({"prompt": "ab", "top_p": 1.01}), 400, "top_p"),
        (json!({"prompt": "ab", "top_k": -5}), 400, "top_k"),
        (json!({"prompt": "ab", "seed": "s"}), 400, "seed"),
        (json!({"prompt": "ab", "stream": 1}), 400, "stream"),
        (json!({"prompt": "ab", "logprobs": 50}), 400, "logprobs"),
        (json!({"prompt": "ab", "stop": 3}), 400, "stop"),
        (
            json!({"prompt": "ab", "stop_token_ids": [86]}),
            400,
            "stop_token_ids",
        ),
        (json!({"prompt": "ab", "n": 2}), 400, "n"),
        (json!({"prompt": "ab", "best_of": 2}), 400, "best_of"),
        (json!({"prompt": "ab", "echo": true}), 400, "echo"),
        (
            json!({"prompt": "ab", "logit_bias": {"5": 1}}),
            400,
            "logit_bias",
        ),
        (
            json!({"prompt": "ab", "presence_penalty": 0.5}),
            400,
            "presence_penalty",
        ),
        (
            json!({"prompt": "ab", "frequency_penalty": 1}),
            400,
            "frequency_penalty",
        ),
        (json!({"prompt": "ab", "suffix": "z"}), 400, "suffix"),
        (json!({"prompt": ""}), 400, "prompt"),
        (json!({"prompt": []}), 400, "prompt"),
        (json!({"max_tokens": 3}), 400, "prompt"),
        (json!({"prompt": [1, 86]}), 400, "prompt"),
        (json!({"prompt": [-1]}), 400, "prompt"),
        (json!({"prompt": "\u{263a}"}), 400, "prompt"),
        (json!({"prompt": ["a", "b"]}), 400, "prompt"),
        (json!({"prompt": vec![5; 2048]}), 400, "prompt"),
        (
            json!({"prompt": vec![5; 2040], "max_tokens": 9}),
            400,
            "max_tokens",
        ),
        (json!({"prompt": "ab", "model": "gpt-4"}), 404, "model"),
    ] {
        assert_error(&s, c, &body.to_string(), status, Some(param))?;
    }
    // Unknown fields are ignored; null is "not given".
    let v = s.complete(
        json!({"prompt": "ab", "max_tokens": 2, "user": "u", "whatever": {"x": [1]},
        "temperature": null, "n": 1, "echo": false, "presence_penalty": 0}),
    )?;
    assert_eq!(v["usage"]["completion_tokens"], 2);
    // Defaults: 16 tokens.
    assert_eq!(
        s.complete(json!({"prompt": "ab"}))?["usage"]["completion_tokens"],
        16
    );
    // Not JSON, not an object, too large.
    assert_error(&s, c, "{\"prompt\": ", 400, None)?;
    assert_error(
        &s,
        c,
        "{\"prompt\": \"a\", \"temperature\": NaN}",
        400,
        None,
    )?;
    assert_error(&s, c, "[1, 2]", 400, None)?;
    let big = json!({"prompt": "a".repeat(70_000)}).to_string();
    assert_error(&s, c, &big, 413, None)?;
    // No chat template for nv-tiny: a 404 that says so.
    let chat = json!({"messages": [{"role": "user", "content": "hi"}]}).to_string();
    let (status, v, _) = s.post("/v1/chat/completions", &chat)?;
    assert_eq!(status, 404, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("no chat template"),
        "{v}"
    );
    let (status, _, _) = s.get("/v1/nothing")?;
    assert_eq!(status, 404);
    // Still serving, and the refusals are counted.
    assert_eq!(
        s.complete(json!({"prompt": [3], "max_tokens": 1}))?["usage"]["completion_tokens"],
        1
    );
    assert!(s.metric(r#"ngpt_http_requests_total{endpoint="completions",status="400"}"#)? >= 30.0);
    Ok(())
}

#[test]
fn a_full_queue_is_a_429_with_retry_after() -> Result<()> {
    let s = Server::start(&nv_tiny(), &["--max-batch", "1", "--max-queue", "1"])?;
    let long = json!({"prompt": [5, 6, 7], "max_tokens": 1500, "temperature": 0, "stream": true});
    // One running, one waiting; the third finds the queue full.
    let mut readers = vec![];
    for _ in 0..2 {
        let resp = agent()
            .post(&format!("{}/v1/completions", s.addr))
            .send(long.to_string())?;
        readers.push(resp.into_body().into_reader());
        std::thread::sleep(Duration::from_millis(100));
    }
    let t0 = Instant::now();
    while s.metric("ngpt_requests_waiting")? < 1.0 {
        ensure!(t0.elapsed() < Duration::from_secs(20), "nothing waits");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (status, v, headers) = s.post("/v1/completions", &long.to_string())?;
    assert_eq!(status, 429, "{v}");
    assert!(headers.get("retry-after").is_some(), "{headers:?}");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    drop(readers);
    Ok(())
}

#[test]
fn api_key_models_health_and_metrics() -> Result<()> {
    let s = Server::start(
        &nv_tiny(),
        &["--api-key", "sesame", "--served-model-name", "tiny"],
    )?;
    // /health needs no key; everything else does.
    assert_eq!(s.get("/health")?.0, 200);
    for path in ["/v1/models", "/metrics"] {
        let (status, body, headers) = s.get(path)?;
        assert_eq!(status, 401, "{path}: {body}");
        assert!(headers.get("www-authenticate").is_some());
        let v: Value = serde_json::from_str(&body)?;
        assert_eq!(v["error"]["type"], "authentication_error");
        let (status, _, _) = request(&s.addr, "GET", path, None, Some("wrong"))?;
        assert_eq!(status, 401);
    }
    let body = json!({"model": "tiny", "prompt": [1, 2], "max_tokens": 2}).to_string();
    let (status, _, _) = request(&s.addr, "POST", "/v1/completions", Some(&body), None)?;
    assert_eq!(status, 401);
    let (status, text, _) = request(
        &s.addr,
        "POST",
        "/v1/completions",
        Some(&body),
        Some("sesame"),
    )?;
    assert_eq!(status, 200, "{text}");

    let (status, text, _) = request(&s.addr, "GET", "/v1/models", None, Some("sesame"))?;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&text)?;
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "tiny");
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["max_model_len"], 2048);

    let (status, text, headers) = request(&s.addr, "GET", "/metrics", None, Some("sesame"))?;
    assert_eq!(status, 200);
    assert!(headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("text/plain")));
    for name in [
        "ngpt_requests_running",
        "ngpt_requests_waiting",
        "ngpt_slots_in_use",
        "ngpt_slots",
        "ngpt_prompt_tokens_total",
        "ngpt_generation_tokens_total",
        "ngpt_time_to_first_token_seconds",
        "ngpt_inter_token_latency_seconds",
        "ngpt_http_requests_total",
        "ngpt_requests_finished_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{text}"
        );
    }
    assert!(text.contains("ngpt_prompt_tokens_total 2"), "{text}");
    assert!(text.contains("ngpt_generation_tokens_total 2"), "{text}");
    assert!(
        text.contains("ngpt_time_to_first_token_seconds_count 1"),
        "{text}"
    );
    assert!(
        text.contains("ngpt_inter_token_latency_seconds_count 1"),
        "{text}"
    );
    assert!(text.contains("ngpt_slots 8"), "{text}");
    Ok(())
}

/// nv-tiny beside a tokenizer_config.json whose chat template uses only characters of its
/// vocabulary.
#[test]
fn chat_completions_render_the_template() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for f in ["ckpt.pt", "config.json", "vocab.json"] {
        std::fs::copy(nv_tiny().join(f), dir.path().join(f))?;
    }
    let template = "{% for m in messages %}{% if m.role == 'user' %}Q: {{ m.content.strip() }}\n{% elif m.role == 'system' %}{{ m.content }}\n{% else %}{{ raise_exception('roles are system and user') }}{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}";
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        json!({"chat_template": template}).to_string(),
    )?;
    let s = Server::start(dir.path(), &[])?;
    let messages = json!([{"role": "system", "content": "Be terse."}, {"role": "user", "content": " Who grants permission. "}]);
    let rendered = "Be terse.\nQ: Who grants permission.\nA:";
    let want = s.complete(json!({"prompt": rendered, "max_tokens": 10, "temperature": 0}))?;
    let want = want["choices"][0]["text"]
        .as_str()
        .context("text")?
        .to_string();
    let body = json!({"messages": messages, "max_tokens": 10, "temperature": 0});
    let (status, v, _) = s.post("/v1/chat/completions", &body.to_string())?;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(v["usage"]["prompt_tokens"], rendered.chars().count());
    let st = stream(&s.addr, "/v1/chat/completions", body)?;
    assert_eq!(st.text, want);
    assert_eq!(st.finish.as_deref(), Some("length"));
    // The template refuses a role: 400 on messages.
    let bad = json!({"messages": [{"role": "assistant", "content": "x"}]}).to_string();
    assert_error(&s, "/v1/chat/completions", &bad, 400, Some("messages"))?;
    assert_error(
        &s,
        "/v1/chat/completions",
        &json!({"messages": "hi"}).to_string(),
        400,
        Some("messages"),
    )?;
    Ok(())
}

#[test]
fn sigterm_drains_running_requests_then_exits_0() -> Result<()> {
    let mut s = Server::start(&nv_tiny(), &["--drain-timeout", "60"])?;
    let body = json!({"prompt": "Permission is ", "max_tokens": 1000, "temperature": 0});
    let addr = s.addr.clone();
    let client = std::thread::spawn(move || stream(&addr, "/v1/completions", body));
    let t0 = Instant::now();
    while s.metric("ngpt_requests_running")? < 1.0 {
        ensure!(t0.elapsed() < Duration::from_secs(20), "never running");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = s.child.id().to_string();
    ensure!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()?
        .success());
    // Draining: /health is 503, new requests are refused, the running one finishes.
    let t0 = Instant::now();
    let mut saw_503 = false;
    while t0.elapsed() < Duration::from_secs(10) {
        match s.get("/health") {
            Ok((503, body, _)) => {
                assert!(body.contains("draining"), "{body}");
                saw_503 = true;
                let (status, v, _) = s.post("/v1/completions", "{\"prompt\": \"a\"}")?;
                assert_eq!(status, 503, "{v}");
                break;
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(2)),
            Err(_) => break, // already gone: the request finished fast
        }
    }
    let got = client
        .join()
        .map_err(|_| anyhow::anyhow!("client panicked"))??;
    assert_eq!(got.finish.as_deref(), Some("length"));
    assert_eq!(got.text.chars().count(), 1000);
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait()? {
            break st;
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "still running after the drain"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit {status}: {}", s.log());
    assert!(saw_503, "/health never answered 503 while draining");
    Ok(())
}

#[test]
fn refusals_at_start_are_one_line() -> Result<()> {
    let o = common::ngpt(&["serve", utf8(&nv_tiny()), "--max-batch", "0"])?;
    assert!(!o.status.success());
    assert!(
        common::stderr(&o).starts_with("error: --max-batch 0"),
        "{}",
        common::stderr(&o)
    );
    // Far more slots than memory: refused before binding, saying how many fit.
    let o = common::ngpt(&[
        "serve",
        utf8(&nv_tiny()),
        "--max-batch",
        "100000000",
        "--port",
        "0",
    ])?;
    let err = common::stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("slots fit"), "{err}");
    assert!(common::stdout(&o).is_empty(), "bound anyway");
    Ok(())
}
