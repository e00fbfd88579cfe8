//! The OpenAI API surface: error objects, and the requests of `/v1/completions` and
//! `/v1/chat/completions` read from JSON and validated field by field.
//!
//! Unknown fields are ignored (clients send many); a known field of the wrong type or
//! range is a 400 naming it; an OpenAI field ngpt does not implement (n > 1, best_of, echo,
//! logit_bias, penalties, suffix, tools) is a 400 naming it, never silently ignored.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

/// Most alternatives `logprobs` may ask for per token (OpenAI's chat limit).
pub const MAX_LOGPROBS: u64 = 20;
/// Most stop strings a request may give (OpenAI's limit).
pub const MAX_STOP: usize = 4;

/// An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds, for a 429's `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400 about `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param.to_string()),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 400 for an OpenAI field ngpt does not implement.
    pub fn unsupported(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            code: Some("unsupported_parameter"),
            ..ApiError::invalid(param, message)
        }
    }

    /// 400 for a body that is not a JSON object.
    pub fn malformed(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 404 for a `model` that is not the one served.
    pub fn model_not_found(asked: &str, served: &str) -> ApiError {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("model: `{asked}` does not exist; this server serves `{served}`"),
            )
        }
    }

    /// 404 for a path or a feature the model does not have.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            code: Some("not_found"),
            ..ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
        }
    }

    /// 401 without the right bearer token.
    pub fn unauthorized() -> ApiError {
        ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "a valid API key is required: send `Authorization: Bearer KEY`",
            )
        }
    }

    /// 413 for a body over `limit` bytes.
    pub fn too_large(limit: usize) -> ApiError {
        ApiError {
            code: Some("request_too_large"),
            ..ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the request body is over the limit of {limit} bytes"),
            )
        }
    }

    /// 429 when the queue holds `limit` requests.
    pub fn queue_full(limit: usize) -> ApiError {
        ApiError {
            code: Some("queue_full"),
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!("the server's queue is full ({limit} requests waiting); retry later"),
            )
        }
    }

    /// 503 while loading or draining.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
        }
    }

    /// 500: the engine failed.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// Parses a body as one JSON object.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::malformed(
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::malformed(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// The name of a JSON value's type, for messages.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Typed reads of a request object's fields; absent and `null` are both "not given".
pub struct Fields<'a>(pub &'a Map<String, Value>);

impl<'a> Fields<'a> {
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    /// An integer in `min..=max`.
    pub fn int(&self, key: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let range = || {
            if max == i64::MAX {
                format!("at least {min}")
            } else {
                format!("in {min}..={max}")
            }
        };
        match v.as_i64() {
            Some(i) if (min..=max).contains(&i) => Ok(Some(i)),
            Some(i) => Err(ApiError::invalid(
                key,
                format!(
                    "{key}: {i} is out of range; expected an integer {}",
                    range()
                ),
            )),
            None => Err(ApiError::invalid(
                key,
                format!(
                    "{key}: expected an integer {}, got {} ({v})",
                    range(),
                    type_name(v)
                ),
            )),
        }
    }

    /// A seed: any integer that fits 64 bits (negative ones are taken as their bits).
    pub fn seed(&self, key: &str) -> Result<Option<u64>, ApiError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match (v.as_u64(), v.as_i64()) {
            (Some(u), _) => Ok(Some(u)),
            (None, Some(i)) => Ok(Some(i as u64)),
            _ => Err(ApiError::invalid(
                key,
                format!("{key}: expected an integer, got {} ({v})", type_name(v)),
            )),
        }
    }

    /// A finite number within `lo..=hi` (`lo` excluded when `lo_open`).
    pub fn number(
        &self,
        key: &str,
        lo: f64,
        lo_open: bool,
        hi: f64,
    ) -> Result<Option<f64>, ApiError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let range = if hi.is_infinite() {
            format!("a finite number at least {lo}")
        } else if lo_open {
            format!("a number in ({lo}, {hi}]")
        } else {
            format!("a number in [{lo}, {hi}]")
        };
        match v.as_f64() {
            Some(x) if x.is_finite() && (if lo_open { x > lo } else { x >= lo }) && x <= hi => {
                Ok(Some(x))
            }
            Some(x) => Err(ApiError::invalid(
                key,
                format!("{key}: {x} is out of range; expected {range}"),
            )),
            None => Err(ApiError::invalid(
                key,
                format!("{key}: expected {range}, got {} ({v})", type_name(v)),
            )),
        }
    }

    pub fn boolean(&self, key: &str) -> Result<Option<bool>, ApiError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_bool().map(Some).ok_or_else(|| {
            ApiError::invalid(
                key,
                format!("{key}: expected a boolean, got {} ({v})", type_name(v)),
            )
        })
    }

    pub fn string(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_str().map(Some).ok_or_else(|| {
            ApiError::invalid(
                key,
                format!("{key}: expected a string, got {}", type_name(v)),
            )
        })
    }

    /// OpenAI's penalties: a number in [-2, 2]; anything but 0 is unsupported.
    fn no_penalty(&self, key: &str) -> Result<(), ApiError> {
        match self.number(key, -2.0, false, 2.0)? {
            Some(x) if x != 0.0 => Err(ApiError::unsupported(
                key,
                format!("{key}: {x} is not supported; ngpt samples without penalties (give 0 or leave it out)"),
            )),
            _ => Ok(()),
        }
    }

    /// `n` (and `best_of`): only 1.
    fn only_one(&self, key: &str) -> Result<(), ApiError> {
        match self.int(key, 1, i64::MAX)? {
            Some(n) if n != 1 => Err(ApiError::unsupported(
                key,
                format!("{key}: {n} is not supported; ngpt returns one choice per request (give 1 or leave it out)"),
            )),
            _ => Ok(()),
        }
    }

    /// `logit_bias`: an object, which must be empty.
    fn no_logit_bias(&self) -> Result<(), ApiError> {
        match self.get("logit_bias") {
            None => Ok(()),
            Some(Value::Object(m)) if m.is_empty() => Ok(()),
            Some(Value::Object(_)) => Err(ApiError::unsupported(
                "logit_bias",
                "logit_bias is not supported; ngpt samples from the model's own logits",
            )),
            Some(v) => Err(ApiError::invalid(
                "logit_bias",
                format!("logit_bias: expected an object, got {}", type_name(v)),
            )),
        }
    }
}

/// A prompt: text for the model's tokenizer, or token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<i64>),
}

/// Sampling and stopping, common to both endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// `None`: the endpoint's default (16 for completions, the rest of the context for chat).
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    /// `None`: a seed of the server's choosing.
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<i64>,
    pub ignore_eos: bool,
    /// Alternatives per token; `Some(0)` is each token's own logprob only.
    pub logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    /// ngpt's (and vLLM's) extension: the generated token ids in each choice.
    pub return_token_ids: bool,
}

/// A validated `/v1/completions` request.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub params: Params,
}

/// One chat message, its content as text.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A validated `/v1/chat/completions` request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<Message>,
    pub params: Params,
}

/// What both endpoints read the same way.
fn common(f: &Fields) -> Result<Params, ApiError> {
    f.only_one("n")?;
    f.no_penalty("presence_penalty")?;
    f.no_penalty("frequency_penalty")?;
    f.no_logit_bias()?;
    let stop = match f.get("stop") {
        None => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOP {
                return Err(ApiError::invalid(
                    "stop",
                    format!("stop: {} strings; at most {MAX_STOP}", items.len()),
                ));
            }
            items
                .iter()
                .map(|s| {
                    s.as_str().map(str::to_string).ok_or_else(|| {
                        ApiError::invalid("stop", "stop: expected a string or a list of strings")
                    })
                })
                .collect::<Result<_, _>>()?
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "stop: expected a string or a list of strings",
            ))
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop: a stop string is empty"));
    }
    let stop_token_ids = match f.get("stop_token_ids") {
        None => vec![],
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| {
                t.as_i64().ok_or_else(|| {
                    ApiError::invalid(
                        "stop_token_ids",
                        "stop_token_ids: expected a list of token ids",
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop_token_ids",
                "stop_token_ids: expected a list of token ids",
            ))
        }
    };
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o).boolean("include_usage")?.unwrap_or(false),
        Some(v) => {
            return Err(ApiError::invalid(
                "stream_options",
                format!("stream_options: expected an object, got {}", type_name(v)),
            ))
        }
    };
    // top_k: vLLM's extension; -1 (vLLM's "all") and 0 both keep every token.
    let top_k = f.int("top_k", -1, i64::MAX)?.unwrap_or(0).max(0) as usize;
    Ok(Params {
        max_tokens: None,
        temperature: f
            .number("temperature", 0.0, false, f64::INFINITY)?
            .unwrap_or(1.0) as f32,
        top_p: f.number("top_p", 0.0, true, 1.0)?.unwrap_or(1.0) as f32,
        top_k,
        seed: f.seed("seed")?,
        stop,
        stop_token_ids,
        ignore_eos: f.boolean("ignore_eos")?.unwrap_or(false),
        logprobs: None,
        stream: f.boolean("stream")?.unwrap_or(false),
        include_usage,
        return_token_ids: f.boolean("return_token_ids")?.unwrap_or(false),
    })
}

fn max_tokens(f: &Fields, key: &str) -> Result<Option<usize>, ApiError> {
    Ok(f.int(key, 1, i64::MAX)?.map(|n| n as usize))
}

impl CompletionRequest {
    pub fn parse(body: &Map<String, Value>) -> Result<CompletionRequest, ApiError> {
        let f = Fields(body);
        let model = f.string("model")?.map(str::to_string);
        f.only_one("best_of")?;
        if f.boolean("echo")? == Some(true) {
            return Err(ApiError::unsupported(
                "echo",
                "echo: true is not supported; the prompt is not sent back",
            ));
        }
        if let Some(s) = f.string("suffix")? {
            if !s.is_empty() {
                return Err(ApiError::unsupported(
                    "suffix",
                    "suffix is not supported; ngpt completes text left to right only",
                ));
            }
        }
        let prompt = parse_prompt(f.get("prompt"))?;
        let mut params = common(&f)?;
        params.max_tokens = max_tokens(&f, "max_tokens")?;
        params.logprobs = f
            .int("logprobs", 0, MAX_LOGPROBS as i64)?
            .map(|n| n as usize);
        Ok(CompletionRequest {
            model,
            prompt,
            params,
        })
    }
}

/// `prompt`: a string, a list of token ids, or a list holding one of them.
fn parse_prompt(v: Option<&Value>) -> Result<Prompt, ApiError> {
    let bad = || ApiError::invalid("prompt", "prompt: expected a string or a list of token ids");
    let ids = |items: &[Value]| -> Result<Vec<i64>, ApiError> {
        items.iter().map(|t| t.as_i64().ok_or_else(bad)).collect()
    };
    let prompt = match v {
        None => return Err(ApiError::invalid("prompt", "prompt: required")),
        Some(Value::String(s)) => Prompt::Text(s.clone()),
        Some(Value::Array(items)) => match items.first() {
            None => Prompt::Tokens(vec![]),
            Some(Value::Number(_)) => Prompt::Tokens(ids(items)?),
            Some(first @ (Value::String(_) | Value::Array(_))) => {
                if items.len() > 1 {
                    return Err(ApiError::unsupported(
                        "prompt",
                        format!(
                            "prompt: a batch of {} prompts is not supported; send one prompt per request",
                            items.len()
                        ),
                    ));
                }
                match first {
                    Value::String(s) => Prompt::Text(s.clone()),
                    Value::Array(inner) => Prompt::Tokens(ids(inner)?),
                    _ => return Err(bad()),
                }
            }
            Some(_) => return Err(bad()),
        },
        Some(_) => return Err(bad()),
    };
    let empty = match &prompt {
        Prompt::Text(s) => s.is_empty(),
        Prompt::Tokens(t) => t.is_empty(),
    };
    if empty {
        return Err(ApiError::invalid(
            "prompt",
            "prompt: empty; expected at least one token",
        ));
    }
    Ok(prompt)
}

impl ChatRequest {
    pub fn parse(body: &Map<String, Value>) -> Result<ChatRequest, ApiError> {
        let f = Fields(body);
        let model = f.string("model")?.map(str::to_string);
        for key in ["tools", "functions"] {
            match f.get(key) {
                None => {}
                Some(Value::Array(a)) if a.is_empty() => {}
                Some(_) => {
                    return Err(ApiError::unsupported(
                        key,
                        format!("{key}: tool calls are not supported"),
                    ))
                }
            }
        }
        if let Some(rf) = f.get("response_format") {
            let kind = rf.get("type").and_then(Value::as_str);
            if kind != Some("text") {
                return Err(ApiError::unsupported(
                    "response_format",
                    "response_format: only {\"type\": \"text\"} is supported",
                ));
            }
        }
        let messages = parse_messages(f.get("messages"))?;
        let mut params = common(&f)?;
        params.max_tokens = match max_tokens(&f, "max_completion_tokens")? {
            Some(n) => Some(n),
            None => max_tokens(&f, "max_tokens")?,
        };
        let top = f
            .int("top_logprobs", 0, MAX_LOGPROBS as i64)?
            .map(|n| n as usize);
        params.logprobs = match f.boolean("logprobs")? {
            Some(true) => Some(top.unwrap_or(0)),
            _ if top.is_some_and(|n| n > 0) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "top_logprobs: needs logprobs: true",
                ))
            }
            _ => None,
        };
        Ok(ChatRequest {
            model,
            messages,
            params,
        })
    }
}

/// `messages`: a non-empty list of `{role, content}`, content as text or as a list of
/// `{"type": "text", "text": ...}` parts.
fn parse_messages(v: Option<&Value>) -> Result<Vec<Message>, ApiError> {
    let items = match v {
        None => return Err(ApiError::invalid("messages", "messages: required")),
        Some(Value::Array(items)) => items,
        Some(v) => {
            return Err(ApiError::invalid(
                "messages",
                format!(
                    "messages: expected a list of messages, got {}",
                    type_name(v)
                ),
            ))
        }
    };
    if items.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages: empty; expected at least one message",
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            let obj = m
                .as_object()
                .ok_or_else(|| ApiError::invalid(&param, format!("{param}: expected an object")))?;
            let role = obj
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::invalid(
                        &format!("{param}.role"),
                        format!("{param}.role: expected a string"),
                    )
                })?
                .to_string();
            let content = match obj.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (
                            part.get("type").and_then(Value::as_str),
                            part.get("text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::unsupported(
                                    &format!("{param}.content"),
                                    format!("{param}.content: only text parts are supported"),
                                ))
                            }
                        }
                    }
                    text
                }
                Some(_) => {
                    return Err(ApiError::invalid(
                        &format!("{param}.content"),
                        format!("{param}.content: expected a string or a list of text parts"),
                    ))
                }
            };
            Ok(Message { role, content })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(v: Value) -> Result<CompletionRequest, ApiError> {
        CompletionRequest::parse(v.as_object().expect("an object"))
    }

    fn param_of(v: Value) -> Option<String> {
        completion(v).expect_err("an error").param
    }

    #[test]
    fn defaults_are_openai_s() {
        let r = completion(json!({"prompt": "ab", "whatever": [1, 2]})).expect("valid");
        assert_eq!(r.prompt, Prompt::Text("ab".into()));
        assert_eq!(r.params.max_tokens, None);
        assert_eq!(r.params.temperature, 1.0);
        assert_eq!(r.params.top_p, 1.0);
        assert!(!r.params.stream);
    }

    #[test]
    fn prompts() {
        let r = completion(json!({"prompt": [[1, 2]]})).expect("valid");
        assert_eq!(r.prompt, Prompt::Tokens(vec![1, 2]));
        let r = completion(json!({"prompt": ["x"]})).expect("valid");
        assert_eq!(r.prompt, Prompt::Text("x".into()));
        for bad in [
            json!(""),
            json!([]),
            json!(3),
            json!(["a", "b"]),
            json!([1.5]),
        ] {
            assert_eq!(
                param_of(json!({ "prompt": bad })).as_deref(),
                Some("prompt")
            );
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            ("max_tokens", json!(0)),
            ("max_tokens", json!("5")),
            ("max_tokens", json!(2.5)),
            ("temperature", json!(-0.5)),
            ("temperature", json!("hot")),
            ("top_p", json!(0)),
            ("top_p", json!(1.5)),
            ("top_k", json!(-2)),
            ("seed", json!("x")),
            ("stream", json!("yes")),
            ("stop", json!(5)),
            ("stop", json!(["a", "b", "c", "d", "e"])),
            ("logprobs", json!(21)),
            ("n", json!(2)),
            ("best_of", json!(3)),
            ("echo", json!(true)),
            ("logit_bias", json!({"5": 10})),
            ("presence_penalty", json!(0.5)),
            ("frequency_penalty", json!(-1)),
            ("suffix", json!("end")),
            ("model", json!(7)),
        ];
        for (key, value) in cases {
            let mut body = json!({"prompt": "ab"});
            body[key] = value.clone();
            assert_eq!(param_of(body).as_deref(), Some(key), "{key}: {value}");
        }
    }

    #[test]
    fn neutral_values_of_unimplemented_fields_pass() {
        let r = completion(json!({"prompt": "a", "n": 1, "best_of": 1, "echo": false,
            "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0, "suffix": null}));
        assert!(r.is_ok());
    }

    #[test]
    fn error_object() {
        let e = ApiError::invalid("top_p", "top_p: bad");
        assert_eq!(
            e.body(),
            json!({"error": {"message": "top_p: bad", "type": "invalid_request_error", "param": "top_p", "code": null}})
        );
    }

    #[test]
    fn chat() {
        let body = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "logprobs": true, "top_logprobs": 2, "max_completion_tokens": 5});
        let r = ChatRequest::parse(body.as_object().expect("object")).expect("valid");
        assert_eq!(r.messages[0].content, "hi");
        assert_eq!(r.params.logprobs, Some(2));
        assert_eq!(r.params.max_tokens, Some(5));
        for (body, param) in [
            (json!({"messages": []}), "messages"),
            (json!({"messages": [{"content": "x"}]}), "messages[0].role"),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "tools": [{}]}),
                "tools",
            ),
        ] {
            let e = ChatRequest::parse(body.as_object().expect("object")).expect_err("error");
            assert_eq!(e.param.as_deref(), Some(param));
        }
    }
}
