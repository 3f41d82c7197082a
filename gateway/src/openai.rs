//! The OpenAI API's shapes the gateway needs: its error body, and the few fields of a
//! completion or chat request that routing reads (the rest passes through untouched). Pure.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// An error answered in OpenAI's form: `{"error": {"message", "type", "code"}}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: &'static str,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: String) -> Self {
        Self {
            status,
            message,
            kind,
            code,
            retry_after: None,
        }
    }

    /// 400: the body is not JSON, or a field is missing or of the wrong type.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            message.into(),
        )
    }

    /// 401: no API key, or one the gateway does not know.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            message.into(),
        )
    }

    /// 404: no backend serves the model, or the key may not use it (the same answer, as
    /// OpenAI gives, so a key cannot probe for models it may not use).
    pub fn unknown_model(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
    }

    /// 404 for a path the gateway does not serve.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            format!("no route for {path}"),
        )
    }

    /// 413: the body is larger than `limits.max_body_bytes`.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body exceeds the gateway's limit of {limit} bytes"),
        )
    }

    /// 429: a rate limit of the key.
    pub fn rate_limited(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after.max(1)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
                message.into(),
            )
        }
    }

    /// 503: no backend can take the request now.
    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after.max(1)),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "no_backend_available",
                message.into(),
            )
        }
    }

    /// 502: every backend tried failed before answering.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            "backend_failed",
            message.into(),
        )
    }

    /// 504: the backend did not answer within `limits.request_timeout_s`.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            "backend_timeout",
            message.into(),
        )
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// Which OpenAI endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    ChatCompletions,
}

impl Endpoint {
    /// The path, as the backends serve it.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::ChatCompletions => "/v1/chat/completions",
        }
    }
}

/// What the prompt is, as the request gives it.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// A completion's text prompt (the first one of a batch).
    Text(String),
    /// A completion's token ids, taken as they are.
    Tokens(Vec<u32>),
    /// A chat's messages, rendered with the model's chat template.
    Messages(Value),
}

/// The fields of a request that routing reads.
#[derive(Clone, Debug, PartialEq)]
pub struct Inspected {
    pub model: String,
    pub stream: bool,
    pub prompt: Prompt,
    /// `max_tokens` (or `max_completion_tokens`), when given: counted against token limits.
    pub max_tokens: Option<u64>,
    /// A chat's `add_generation_prompt` (vLLM's extension; default true).
    pub add_generation_prompt: bool,
    /// A chat's `continue_final_message` (vLLM's extension; default false).
    pub continue_final_message: bool,
}

/// Reads the routing fields of `body`, or says which one is wrong (400).
pub fn inspect(endpoint: Endpoint, body: &[u8]) -> Result<Inspected, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(Value::String(_)) | None => {
            return Err(ApiError::bad_request(
                "missing required field `model` (a served model name; GET /v1/models lists them)",
            ));
        }
        Some(other) => return Err(wrong_type("model", "a string", other)),
    };
    let stream = flag(obj.get("stream"), "stream", false)?;
    let mut max_tokens = None;
    for field in ["max_tokens", "max_completion_tokens"] {
        match obj.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) if n.as_u64().is_some() => max_tokens = n.as_u64(),
            Some(other) => return Err(wrong_type(field, "a non-negative integer", other)),
        }
    }
    let prompt = match endpoint {
        Endpoint::Completions => completion_prompt(obj.get("prompt"))?,
        Endpoint::ChatCompletions => chat_messages(obj.get("messages"))?,
    };
    Ok(Inspected {
        model,
        stream,
        prompt,
        max_tokens,
        add_generation_prompt: flag(
            obj.get("add_generation_prompt"),
            "add_generation_prompt",
            true,
        )?,
        continue_final_message: flag(
            obj.get("continue_final_message"),
            "continue_final_message",
            false,
        )?,
    })
}

fn flag(v: Option<&Value>, field: &str, default: bool) -> Result<bool, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(wrong_type(field, "a boolean", other)),
    }
}

fn wrong_type(field: &str, expected: &str, got: &Value) -> ApiError {
    let got = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    ApiError::bad_request(format!("`{field}` must be {expected}, got {got}"))
}

/// A completion's `prompt`: a string, token ids, or a batch of either (routed on its first).
fn completion_prompt(v: Option<&Value>) -> Result<Prompt, ApiError> {
    let expected = "a string, an array of token ids, or an array of those";
    match v {
        None | Some(Value::Null) => Err(ApiError::bad_request(
            "missing required field `prompt` (/v1/completions)",
        )),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(items)) if items.is_empty() => {
            Err(ApiError::bad_request("`prompt` must not be empty"))
        }
        Some(Value::Array(items)) => match &items[0] {
            Value::Number(_) => token_ids(items).map(Prompt::Tokens),
            Value::String(s) => {
                if items.iter().all(Value::is_string) {
                    Ok(Prompt::Text(s.clone()))
                } else {
                    Err(wrong_type("prompt", expected, &items[1]))
                }
            }
            Value::Array(first) => {
                if items.iter().all(Value::is_array) {
                    token_ids(first).map(Prompt::Tokens)
                } else {
                    Err(wrong_type("prompt", expected, &Value::Array(items.clone())))
                }
            }
            other => Err(wrong_type("prompt", expected, other)),
        },
        Some(other) => Err(wrong_type("prompt", expected, other)),
    }
}

fn token_ids(items: &[Value]) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .map(|t| {
            t.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .ok_or_else(|| {
                    ApiError::bad_request("token ids in `prompt` must be integers in 0..2^32")
                })
        })
        .collect()
}

/// A chat's `messages`: a non-empty array of objects with a string `role`.
fn chat_messages(v: Option<&Value>) -> Result<Prompt, ApiError> {
    let messages = match v {
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request(
                "missing required field `messages` (/v1/chat/completions)",
            ));
        }
        Some(Value::Array(m)) if m.is_empty() => {
            return Err(ApiError::bad_request("`messages` must not be empty"));
        }
        Some(Value::Array(m)) => m,
        Some(other) => return Err(wrong_type("messages", "an array of messages", other)),
    };
    for (i, m) in messages.iter().enumerate() {
        match m.get("role") {
            Some(Value::String(_)) => {}
            _ => {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}] must be an object with a string `role`"
                )));
            }
        }
    }
    Ok(Prompt::Messages(Value::Array(messages.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(endpoint: Endpoint, body: &str) -> String {
        inspect(endpoint, body.as_bytes()).unwrap_err().message
    }

    #[test]
    fn completion_prompts_in_every_form_are_read() {
        let text = inspect(
            Endpoint::Completions,
            br#"{"model":"m","prompt":"hi","stream":true,"max_tokens":5}"#,
        )
        .unwrap();
        assert_eq!(text.prompt, Prompt::Text("hi".into()));
        assert!(text.stream);
        assert_eq!(text.max_tokens, Some(5));
        let ids = inspect(Endpoint::Completions, br#"{"model":"m","prompt":[1,2,3]}"#).unwrap();
        assert_eq!(ids.prompt, Prompt::Tokens(vec![1, 2, 3]));
        let batch = inspect(
            Endpoint::Completions,
            br#"{"model":"m","prompt":[[4,5],[6]]}"#,
        )
        .unwrap();
        assert_eq!(batch.prompt, Prompt::Tokens(vec![4, 5]));
        let texts = inspect(
            Endpoint::Completions,
            br#"{"model":"m","prompt":["a","b"]}"#,
        )
        .unwrap();
        assert_eq!(texts.prompt, Prompt::Text("a".into()));
    }

    #[test]
    fn bad_bodies_are_refused_with_the_field_named() {
        assert!(err(Endpoint::Completions, "{not json").contains("not valid JSON"));
        assert!(err(Endpoint::Completions, "[1]").contains("JSON object"));
        assert!(err(Endpoint::Completions, r#"{"prompt":"x"}"#).contains("`model`"));
        assert!(
            err(Endpoint::Completions, r#"{"model":3,"prompt":"x"}"#)
                .contains("`model` must be a string")
        );
        assert!(err(Endpoint::Completions, r#"{"model":"m"}"#).contains("`prompt`"));
        assert!(err(Endpoint::Completions, r#"{"model":"m","prompt":[-1]}"#).contains("token ids"));
        assert!(
            err(
                Endpoint::Completions,
                r#"{"model":"m","prompt":"x","stream":"yes"}"#
            )
            .contains("`stream` must be a boolean")
        );
        assert!(
            err(
                Endpoint::Completions,
                r#"{"model":"m","prompt":"x","max_tokens":-2}"#
            )
            .contains("max_tokens")
        );
        assert!(
            err(Endpoint::ChatCompletions, r#"{"model":"m","messages":[]}"#)
                .contains("must not be empty")
        );
        assert!(
            err(
                Endpoint::ChatCompletions,
                r#"{"model":"m","messages":[{"content":"x"}]}"#
            )
            .contains("messages[0]")
        );
    }

    #[test]
    fn errors_have_openais_body_and_retry_after() {
        let e = ApiError::rate_limited("slow down", 0);
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.retry_after, Some(1));
        assert_eq!(e.body()["error"]["code"], "rate_limit_exceeded");
        let r = ApiError::unavailable("none", 2).into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert_eq!(ApiError::unknown_model("x").status, StatusCode::NOT_FOUND);
    }
}
