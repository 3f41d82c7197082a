//! Engine-exact prompt tokens: the model's own tokenizer.json (HF `tokenizers`) and its chat
//! template (`minijinja` with Python-compatible methods), used as vLLM uses them, so the gateway
//! keys exactly the blocks an engine computes: a completion's text is encoded with special
//! tokens (vLLM's default for /v1/completions), a chat is rendered with
//! `add_generation_prompt` and encoded without them (the template writes its own).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use minijinja::{Environment, Error, ErrorKind, Value as JinjaValue};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::openai::{Inspected, Prompt};

/// The name the chat template is registered under.
const TEMPLATE: &str = "chat";

/// A model's tokenizer and chat template.
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    chat: Option<Environment<'static>>,
    bos_token: String,
    eos_token: String,
    dir: PathBuf,
}

impl PromptTokenizer {
    /// Loads `dir/tokenizer.json` and the chat template (`dir/chat_template.jinja`, or
    /// `chat_template` in `dir/tokenizer_config.json`).
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let file = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&file)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("cannot load the tokenizer {}", file.display()))?;
        let config: Value = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
            Ok(text) => serde_json::from_str(&text).with_context(|| {
                format!("invalid {}", dir.join("tokenizer_config.json").display())
            })?,
            Err(_) => Value::Null,
        };
        let template = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(t) => Some(t),
            Err(_) => template_from_config(&config),
        };
        let chat = match template {
            Some(t) => Some(environment(t).with_context(|| {
                format!("the chat template of {} does not compile", dir.display())
            })?),
            None => None,
        };
        Ok(Self {
            tokenizer,
            chat,
            bos_token: special_token(&config, "bos_token"),
            eos_token: special_token(&config, "eos_token"),
            dir: dir.to_path_buf(),
        })
    }

    /// The directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether chats can be tokenized (the model has a chat template).
    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// The prompt's tokens as the engine will see them.
    pub fn tokens(&self, request: &Inspected) -> anyhow::Result<Vec<u32>> {
        match &request.prompt {
            Prompt::Tokens(ids) => Ok(ids.clone()),
            Prompt::Text(text) => self.encode(text, true),
            Prompt::Messages(messages) => {
                let text = self.render_chat(
                    messages,
                    request.add_generation_prompt && !request.continue_final_message,
                )?;
                self.encode(&text, false)
            }
        }
    }

    /// Renders a chat with the model's template.
    pub fn render_chat(
        &self,
        messages: &Value,
        add_generation_prompt: bool,
    ) -> anyhow::Result<String> {
        let Some(env) = &self.chat else {
            bail!("the model has no chat template");
        };
        let template = env.get_template(TEMPLATE).expect("registered at load");
        let ctx = minijinja::context! {
            messages => JinjaValue::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        template
            .render(ctx)
            .map_err(|e| anyhow::anyhow!("the chat template failed: {e:#}"))
    }

    fn encode(&self, text: &str, special: bool) -> anyhow::Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }
}

/// `chat_template` of tokenizer_config.json: a string, or a list of named templates (the one
/// named "default" is the one vLLM uses without tools).
fn template_from_config(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(t) => Some(t.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| named.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

/// A special token of tokenizer_config.json: a string or an `{"content": ...}` object.
fn special_token(config: &Value, name: &str) -> String {
    match config.get(name) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

/// A Jinja environment as HF's templates expect it: Python string and dict methods, `tojson`,
/// `raise_exception`, trimmed blocks.
fn environment(template: String) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()?,
    );
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_template_owned(TEMPLATE, template)?;
    Ok(env)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn hf_style_templates_render_with_python_methods_and_generation_prompt() {
        let env = environment(
            "{% for m in messages %}{{ m['role'].upper() }}: {{ m.content.strip() }}\n{% endfor %}\
             {% if add_generation_prompt %}ASSISTANT:{% endif %}"
                .into(),
        )
        .unwrap();
        let t = env.get_template(TEMPLATE).unwrap();
        let out = t
            .render(minijinja::context! {
                messages => JinjaValue::from(minijinja::value::Serde(json!([{"role": "user", "content": " hi "}]))),
                add_generation_prompt => true,
            })
            .unwrap();
        assert_eq!(out, "USER: hi\nASSISTANT:");
    }

    #[test]
    fn raise_exception_fails_the_render_with_its_message() {
        let env =
            environment("{{ raise_exception('only user and assistant roles') }}".into()).unwrap();
        let err = env
            .get_template(TEMPLATE)
            .unwrap()
            .render(minijinja::context! {})
            .unwrap_err();
        assert!(err.to_string().contains("only user and assistant"), "{err}");
    }

    #[test]
    fn templates_are_found_as_a_string_or_a_named_list() {
        assert_eq!(
            template_from_config(&json!({"chat_template": "x"})).as_deref(),
            Some("x")
        );
        let named = json!({"chat_template": [{"name": "tool_use", "template": "t"},
                                             {"name": "default", "template": "d"}]});
        assert_eq!(template_from_config(&named).as_deref(), Some("d"));
        assert_eq!(
            special_token(&json!({"bos_token": {"content": "<s>"}}), "bos_token"),
            "<s>"
        );
    }
}
