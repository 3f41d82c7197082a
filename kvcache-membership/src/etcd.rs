//! A small etcd v3 client over etcd's JSON gateway (`POST /v3/...`, HTTP/1.1), enough for
//! cluster membership: leases (grant, keep alive, revoke), put, delete and prefix range.
//!
//! Why not a gRPC client: the `etcd-client` crate pulls in tonic and a protobuf compiler at build
//! time, for five calls that membership makes a few times a second at most. The gateway ships
//! with every etcd v3 (Debian's 3.4 included) and speaks plain JSON, with keys and values in
//! base64. Each call opens one connection and closes it, so a restarted etcd needs no reconnect
//! logic, and every call is bounded by a timeout.
//!
//! An etcd with authentication on (`etcdctl auth enable`) is reached as a user: the URL names it
//! (`http://USER@host:port`) and the password comes from `KVCACHE_ETCD_PASSWORD` (or, less
//! privately, the URL: `http://USER:PASSWORD@host:port`). The client trades them for a token
//! (`/v3/auth/authenticate`), sends it on every call, and fetches a new one when etcd says the
//! token expired. Give nodes a role that may write `/kvcache/members/` and clients one that may
//! only read it (docs/SECURITY.md, H8).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The key prefix under which kvcache nodes register (`kvcache-server --etcd`); each key is
/// followed by the node id and holds `{"addr": "host:port"}`.
pub const MEMBERS_PREFIX: &str = "/kvcache/members/";

/// The key prefix under which inference engines register (the vLLM connector with `advertise`
/// set); each key is followed by the engine's URL without its scheme and holds its record:
/// `{"url", "model", "role", "block_size", "namespace", "kv_events", "kv_events_replay",
/// "kv_events_topic"}`. Gateways and the LoRA manager watch it.
pub const ENGINES_PREFIX: &str = "/kvcache/engines/";

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The URL is not `http://host:port`.
    #[error("bad etcd URL {0:?}: expected http://[USER@]host:port (or etcd://[USER@]host:port)")]
    BadUrl(String),
    /// etcd refused the user's name or password, or this user may not do what was asked.
    #[error("etcd at {addr} refused user {user:?}: {message}")]
    Denied {
        addr: String,
        user: String,
        message: String,
    },
    /// No connection, or it broke.
    #[error("etcd at {addr} unreachable: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    /// No answer within the timeout.
    #[error("etcd at {0} did not answer in time")]
    Timeout(String),
    /// etcd answered with an error or something that is not its JSON.
    #[error("etcd at {addr}: {message}")]
    Reply { addr: String, message: String },
}

/// An etcd endpoint.
#[derive(Clone)]
pub struct Etcd {
    addr: String,
    timeout: Duration,
    user: Option<User>,
}

/// A user of an etcd with authentication on, and its current token.
#[derive(Clone)]
struct User {
    name: String,
    password: String,
    token: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("addr", &self.addr)
            .field("user", &self.user.as_ref().map(|u| &u.name))
            .finish()
    }
}

impl Etcd {
    /// `url` is `http://[USER[:PASSWORD]@]host:port`, the same with `etcd://`, or `host:port`.
    /// A user without a password in the URL takes `KVCACHE_ETCD_PASSWORD`.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, EtcdError> {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("etcd://"))
            .unwrap_or(url)
            .trim_end_matches('/');
        let (userinfo, addr) = match rest.rsplit_once('@') {
            Some((u, a)) => (Some(u), a),
            None => (None, rest),
        };
        if addr.is_empty() || addr.contains('/') || !addr.contains(':') {
            return Err(EtcdError::BadUrl(redact(url)));
        }
        let user = match userinfo {
            None => None,
            Some(info) => {
                let (name, password) = match info.split_once(':') {
                    Some((n, p)) => (n.to_string(), p.to_string()),
                    None => (
                        info.to_string(),
                        std::env::var("KVCACHE_ETCD_PASSWORD").unwrap_or_default(),
                    ),
                };
                if name.is_empty() {
                    return Err(EtcdError::BadUrl(redact(url)));
                }
                Some(User {
                    name,
                    password,
                    token: Arc::default(),
                })
            }
        };
        Ok(Self {
            addr: addr.to_string(),
            timeout,
            user,
        })
    }

    /// `host:port` of the endpoint.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The etcd user this endpoint authenticates as, if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_ref().map(|u| u.name.as_str())
    }

    /// A new lease of `ttl` seconds; its id.
    pub async fn grant(&self, ttl: u64) -> Result<i64, EtcdError> {
        let reply = self.call("/v3/lease/grant", json!({ "TTL": ttl })).await?;
        self.int(&reply, "ID")
    }

    /// Refreshes a lease; false if etcd no longer knows it (expired or revoked).
    pub async fn keep_alive(&self, lease: i64) -> Result<bool, EtcdError> {
        let reply = self
            .call("/v3/lease/keepalive", json!({ "ID": lease.to_string() }))
            .await?;
        let result = reply.get("result").unwrap_or(&reply);
        // An unknown lease comes back without a TTL (zero is omitted from the JSON).
        Ok(result
            .get("TTL")
            .and_then(as_i64)
            .is_some_and(|ttl| ttl > 0))
    }

    /// Revokes a lease, deleting the keys attached to it.
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", json!({ "ID": lease.to_string() }))
            .await
            .map(drop)
    }

    /// Puts `key = value`, attached to `lease` if given.
    pub async fn put(&self, key: &str, value: &str, lease: Option<i64>) -> Result<(), EtcdError> {
        let mut body = json!({ "key": b64(key.as_bytes()), "value": b64(value.as_bytes()) });
        if let Some(lease) = lease {
            body["lease"] = json!(lease.to_string());
        }
        self.call("/v3/kv/put", body).await.map(drop)
    }

    /// Every `(key, value)` whose key starts with `prefix`, in key order.
    pub async fn range_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>, EtcdError> {
        let body = json!({
            "key": b64(prefix.as_bytes()),
            "range_end": b64(&prefix_end(prefix.as_bytes())),
        });
        let reply = self.call("/v3/kv/range", body).await?;
        let mut out = Vec::new();
        for kv in reply
            .get("kvs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let field = |name: &str| {
                kv.get(name)
                    .and_then(Value::as_str)
                    .and_then(unb64)
                    .and_then(|b| String::from_utf8(b).ok())
            };
            match (field("key"), field("value")) {
                (Some(k), Some(v)) => out.push((k, v)),
                _ => return Err(self.bad("a key or value is not base64 UTF-8")),
            }
        }
        Ok(out)
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) -> Result<(), EtcdError> {
        self.call("/v3/kv/deleterange", json!({ "key": b64(key.as_bytes()) }))
            .await
            .map(drop)
    }

    fn bad(&self, message: impl Into<String>) -> EtcdError {
        EtcdError::Reply {
            addr: self.addr.clone(),
            message: message.into(),
        }
    }

    fn int(&self, reply: &Value, name: &str) -> Result<i64, EtcdError> {
        reply
            .get(name)
            .and_then(as_i64)
            .ok_or_else(|| self.bad(format!("reply lacks {name}")))
    }

    /// POSTs `body` to `path` as this endpoint's user and returns the JSON reply. A token that
    /// etcd no longer accepts (expired, or etcd restarted) is replaced once.
    async fn call(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        let Some(user) = &self.user else {
            return match self.post(path, &body, None).await {
                Err(EtcdError::Reply { message, .. }) if message.contains("user name is empty") => {
                    Err(EtcdError::Denied {
                        addr: self.addr.clone(),
                        user: String::new(),
                        message: "etcd has authentication on: name a user in the URL \
                                  (http://USER@host:port) and set KVCACHE_ETCD_PASSWORD"
                            .into(),
                    })
                }
                other => other,
            };
        };
        for fresh in [false, true] {
            let token = self.token(user, fresh).await?;
            match self.post(path, &body, Some(&token)).await {
                Err(EtcdError::Reply { message, .. })
                    if !fresh && message.contains("invalid auth token") => {}
                Err(EtcdError::Reply { message, .. }) if message.contains("permission denied") => {
                    return Err(EtcdError::Denied {
                        addr: self.addr.clone(),
                        user: user.name.clone(),
                        message: format!("{message} ({path})"),
                    });
                }
                other => return other,
            }
        }
        unreachable!("the second attempt returns")
    }

    /// The user's token: the one held, or a new one from etcd.
    async fn token(&self, user: &User, fresh: bool) -> Result<String, EtcdError> {
        let held = user.token.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(t) = held.filter(|_| !fresh) {
            return Ok(t);
        }
        let body = json!({ "name": user.name, "password": user.password });
        let reply = match self.post("/v3/auth/authenticate", &body, None).await {
            Err(EtcdError::Reply { message, .. }) => {
                return Err(EtcdError::Denied {
                    addr: self.addr.clone(),
                    user: user.name.clone(),
                    message,
                });
            }
            other => other?,
        };
        let token = reply
            .get("token")
            .and_then(Value::as_str)
            .ok_or_else(|| self.bad("authenticate: reply lacks a token (is auth enabled?)"))?
            .to_string();
        *user.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
        Ok(token)
    }

    /// One HTTP exchange: POSTs `body` to `path` and returns the JSON reply (one object; a
    /// streamed reply's first).
    async fn post(
        &self,
        path: &str,
        body: &Value,
        token: Option<&str>,
    ) -> Result<Value, EtcdError> {
        let body = body.to_string();
        let auth = token.map_or(String::new(), |t| format!("Authorization: {t}\r\n"));
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{auth}\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        let exchange = async {
            let mut stream = TcpStream::connect(&self.addr).await?;
            stream.write_all(request.as_bytes()).await?;
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await?;
            Ok::<_, std::io::Error>(raw)
        };
        let raw = match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => return Err(EtcdError::Timeout(self.addr.clone())),
            Ok(Err(source)) => {
                return Err(EtcdError::Io {
                    addr: self.addr.clone(),
                    source,
                });
            }
            Ok(Ok(raw)) => raw,
        };
        let (status, body) =
            parse_response(&raw).ok_or_else(|| self.bad("malformed HTTP reply"))?;
        let text = String::from_utf8_lossy(&body);
        // A streamed reply (keepalive) holds one JSON object per line; the first is ours.
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        let value: Value = serde_json::from_str(first)
            .map_err(|e| self.bad(format!("HTTP {status}, not JSON ({e}): {first:.200}")))?;
        if let Some(message) = value.get("error").and_then(Value::as_str) {
            return Err(self.bad(message.to_string()));
        }
        if status != 200 {
            return Err(self.bad(format!("HTTP {status}: {first:.200}")));
        }
        Ok(value)
    }
}

/// `url` with any password replaced by `***`, for errors and logs.
fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    match rest.rsplit_once('@') {
        Some((info, host)) if info.contains(':') => {
            let user = info.split_once(':').map_or(info, |(u, _)| u);
            let sep = if scheme.is_empty() { "" } else { "://" };
            format!("{scheme}{sep}{user}:***@{host}")
        }
        _ => url.to_string(),
    }
}

/// etcd's JSON writes 64-bit integers as strings.
fn as_i64(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str()?.parse().ok())
}

/// The end of the key range holding every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

/// Status code and body (chunked transfer decoded) of an HTTP/1.1 response.
fn parse_response(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = &raw[split + 4..];
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Some((status, body.to_vec()));
    }
    let (mut out, mut rest) = (Vec::new(), body);
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some((status, out));
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unb64(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = B64.iter().position(|&b| b == c)? as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_matches_the_standard() {
        assert_eq!(b64(b""), "");
        assert_eq!(b64(b"a"), "YQ==");
        assert_eq!(b64(b"ab"), "YWI=");
        assert_eq!(b64(b"abc"), "YWJj");
        assert_eq!(b64(b"/kvcache/members/"), "L2t2Y2FjaGUvbWVtYmVycy8=");
        for n in 0..40u8 {
            let data: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(unb64(&b64(&data)).unwrap(), data);
        }
        assert_eq!(unb64("not*base64"), None);
    }

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn http_replies_are_parsed_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain), Some((200, b"{}".to_vec())));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked), Some((200, b"{\"a\":1}".to_vec())));
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\n"), None);
        let truncated = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nab";
        assert_eq!(parse_response(truncated), None);
    }

    #[test]
    fn urls_name_a_host_and_port() {
        let d = Duration::from_secs(1);
        assert_eq!(
            Etcd::new("http://127.0.0.1:2379", d).unwrap().addr(),
            "127.0.0.1:2379"
        );
        assert_eq!(Etcd::new("etcd://h:1/", d).unwrap().addr(), "h:1");
        assert!(matches!(
            Etcd::new("http://h", d),
            Err(EtcdError::BadUrl(_))
        ));
        assert!(matches!(
            Etcd::new("http://h:1/x", d),
            Err(EtcdError::BadUrl(_))
        ));
    }

    #[test]
    fn a_user_in_the_url_is_parsed_and_its_password_never_shown() {
        let d = Duration::from_secs(1);
        let e = Etcd::new("etcd://node:s3cret@h:1", d).unwrap();
        assert_eq!((e.addr(), e.user()), ("h:1", Some("node")));
        assert!(!format!("{e:?}").contains("s3cret"));
        assert_eq!(Etcd::new("h:1", d).unwrap().user(), None);
        let err = Etcd::new("http://node:s3cret@h", d)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("node:***@h") && !err.contains("s3cret"),
            "{err}"
        );
        assert!(matches!(
            Etcd::new("http://@h:1", d),
            Err(EtcdError::BadUrl(_))
        ));
    }
}
