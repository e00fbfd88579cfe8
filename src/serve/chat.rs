//! Hugging Face chat templates: `chat_template.jinja`, or `tokenizer_config.json`'s
//! `chat_template` (a string, or a list of `{name, template}` of which `default` is used),
//! rendered with minijinja and its Python-compatible methods (`.strip()`, `.startswith()`,
//! ...), as transformers' `apply_chat_template` renders them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use minijinja::{context, Environment, ErrorKind};
use serde_json::Value;

use super::api::Message;

/// A model's chat template, compiled once.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    /// The file it came from.
    pub source: PathBuf,
}

const NAME: &str = "chat";

/// A special token as `tokenizer_config.json` writes it: text, or `{"content": text}`.
fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template in the first of `dirs` that has one; `None` when none has.
    pub fn find(dirs: &[PathBuf]) -> Result<Option<ChatTemplate>> {
        for dir in dirs {
            let config_path = dir.join("tokenizer_config.json");
            let config: Option<Value> = if config_path.is_file() {
                let text = std::fs::read_to_string(&config_path)
                    .with_context(|| config_path.display().to_string())?;
                Some(serde_json::from_str(&text).map_err(|e| {
                    anyhow::anyhow!("{}: not valid JSON: {e}", config_path.display())
                })?)
            } else {
                None
            };
            let bos = token_text(config.as_ref().and_then(|c| c.get("bos_token")));
            let eos = token_text(config.as_ref().and_then(|c| c.get("eos_token")));
            let jinja = dir.join("chat_template.jinja");
            if jinja.is_file() {
                let text =
                    std::fs::read_to_string(&jinja).with_context(|| jinja.display().to_string())?;
                return ChatTemplate::new(text, bos, eos, &jinja).map(Some);
            }
            let template = match config.as_ref().and_then(|c| c.get("chat_template")) {
                None | Some(Value::Null) => continue,
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(named)) => {
                    let default = named
                        .iter()
                        .find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
                    match default
                        .and_then(|t| t.get("template"))
                        .and_then(Value::as_str)
                    {
                        Some(t) => t.to_string(),
                        None => bail!(
                            "{}: `chat_template` is a list without a template named `default`",
                            config_path.display()
                        ),
                    }
                }
                Some(_) => bail!(
                    "{}: `chat_template` is neither a string nor a list of named templates",
                    config_path.display()
                ),
            };
            return ChatTemplate::new(template, bos, eos, &config_path).map(Some);
        }
        Ok(None)
    }

    /// Compiles `template` (from `source`, named in errors).
    pub fn new(template: String, bos: String, eos: String, source: &Path) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // transformers' templates call raise_exception("...") to refuse a conversation.
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned(NAME, template).map_err(|e| {
            anyhow::anyhow!(
                "{}: the chat template does not compile: {e}",
                source.display()
            )
        })?;
        Ok(ChatTemplate {
            env,
            bos,
            eos,
            source: source.to_path_buf(),
        })
    }

    /// The prompt text for `messages`, ending where the assistant's answer starts. A
    /// template that refuses the conversation (`raise_exception`) gives its message.
    pub fn render(&self, messages: &[Message]) -> Result<String, String> {
        let t = self.env.get_template(NAME).map_err(|e| e.to_string())?;
        t.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation => e.detail().unwrap_or("refused").to_string(),
            _ => e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A ChatML-style template as many tokenizer_config.json files carry, with Python
    /// string methods and raise_exception.
    const CHATML: &str = "{{ bos_token }}{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m.role) }}{% endif %}<|{{ m.role }}|>{{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

    #[test]
    fn renders_hf_templates() {
        let t = ChatTemplate::new(CHATML.into(), "<s>".into(), "</s>".into(), Path::new("t"))
            .expect("compiles");
        let out = t
            .render(&[msg("system", " be brief "), msg("user", "hi")])
            .expect("renders");
        assert_eq!(out, "<s><|system|>be brief\n<|user|>hi\n<|assistant|>");
        let err = t.render(&[msg("tool", "x")]).expect_err("refused");
        assert!(err.contains("unknown role tool"), "{err}");
    }

    #[test]
    fn finds_the_template_in_tokenizer_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(ChatTemplate::find(&[dir.path().to_path_buf()])
            .expect("reads")
            .is_none());
        let config = serde_json::json!({
            "bos_token": {"content": "<s>"},
            "chat_template": [{"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"}],
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string())
            .expect("write");
        let t = ChatTemplate::find(&[dir.path().to_path_buf()])
            .expect("reads")
            .expect("found");
        assert_eq!(t.render(&[msg("user", "yo")]).expect("renders"), "<s>yo");
    }
}
