//! API keys and their limits, pure: time comes in as seconds. A key is found by comparing every
//! configured key in constant time; per-key limits are token buckets that refill continuously
//! (a per-minute limit of N holds at most N and refills N every 60 s).

use std::collections::HashMap;

use crate::config::ApiKey;

/// Why a request is refused.
#[derive(Clone, Debug, PartialEq)]
pub enum Refusal {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A key the gateway does not know.
    Wrong,
    /// Over the key's requests per minute; retry after this many seconds.
    Requests { retry_after: u64 },
    /// Over the key's tokens per minute; retry after this many seconds (None: the request is
    /// larger than the whole per-minute limit and never fits).
    Tokens { retry_after: Option<u64> },
}

/// A token bucket.
#[derive(Clone, Debug)]
struct Bucket {
    per_minute: f64,
    level: f64,
    at: f64,
}

impl Bucket {
    fn new(per_minute: f64) -> Self {
        Self {
            per_minute,
            level: per_minute,
            at: 0.0,
        }
    }

    fn refill(&mut self, now: f64) {
        let elapsed = (now - self.at).max(0.0);
        self.level = (self.level + elapsed * self.per_minute / 60.0).min(self.per_minute);
        self.at = now;
    }

    /// Seconds until `n` fit (0: they fit now), after a refill to `now`.
    fn wait_for(&mut self, n: f64, now: f64) -> Option<f64> {
        self.refill(now);
        if n > self.per_minute {
            return None;
        }
        Some(((n - self.level).max(0.0)) * 60.0 / self.per_minute)
    }
}

#[derive(Clone, Debug)]
struct KeyState {
    key: ApiKey,
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

/// The configured keys and their buckets.
#[derive(Clone, Debug, Default)]
pub struct Access {
    keys: Vec<KeyState>,
    by_name: HashMap<String, usize>,
}

/// A key that was let in: its position, for [`Access::admit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyId(usize);

impl Access {
    /// The gateway's keys; none means no authentication.
    pub fn new(keys: Vec<ApiKey>) -> Self {
        let by_name = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.name.clone(), i))
            .collect();
        let keys = keys
            .into_iter()
            .map(|key| KeyState {
                requests: key.requests_per_minute.map(|n| Bucket::new(n as f64)),
                tokens: key.tokens_per_minute.map(|n| Bucket::new(n as f64)),
                key,
            })
            .collect();
        Self { keys, by_name }
    }

    /// Whether requests need a key.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Finds the key of an `Authorization` header value; `Ok(None)` when keys are off.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Option<KeyId>, Refusal> {
        if !self.enabled() {
            return Ok(None);
        }
        let presented = authorization
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or(Refusal::Missing)?;
        let mut found = None;
        for (i, k) in self.keys.iter().enumerate() {
            if constant_time_eq(k.key.key.as_bytes(), presented.as_bytes()) {
                found = Some(i);
            }
        }
        found.map(|i| Some(KeyId(i))).ok_or(Refusal::Wrong)
    }

    /// The key's name, for logs and metrics (never the key).
    pub fn name(&self, id: KeyId) -> &str {
        &self.keys[id.0].key.name
    }

    /// A key by its name (tests, status).
    pub fn by_name(&self, name: &str) -> Option<KeyId> {
        self.by_name.get(name).copied().map(KeyId)
    }

    /// Whether key `id` may use `model`.
    pub fn allows(&self, id: KeyId, model: &str) -> bool {
        match &self.keys[id.0].key.models {
            None => true,
            Some(models) => models.iter().any(|m| m == model),
        }
    }

    /// Takes one request and `tokens` tokens from key `id`'s buckets at `now` (seconds), or
    /// refuses without taking anything.
    pub fn admit(&mut self, id: KeyId, tokens: u64, now: f64) -> Result<(), Refusal> {
        let k = &mut self.keys[id.0];
        let request_wait = k.requests.as_mut().and_then(|b| b.wait_for(1.0, now));
        if let Some(wait) = request_wait
            && wait > 0.0
        {
            return Err(Refusal::Requests {
                retry_after: wait.ceil() as u64,
            });
        }
        if let Some(b) = k.tokens.as_mut() {
            match b.wait_for(tokens as f64, now) {
                None => return Err(Refusal::Tokens { retry_after: None }),
                Some(wait) if wait > 0.0 => {
                    return Err(Refusal::Tokens {
                        retry_after: Some(wait.ceil() as u64),
                    });
                }
                Some(_) => b.level -= tokens as f64,
            }
        }
        if let Some(b) = k.requests.as_mut() {
            b.level -= 1.0;
        }
        Ok(())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(key: &str, rpm: Option<u32>, tpm: Option<u64>, models: Option<Vec<&str>>) -> ApiKey {
        ApiKey {
            key: key.into(),
            name: format!("name-{key}"),
            models: models.map(|m| m.into_iter().map(String::from).collect()),
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
        }
    }

    #[test]
    fn no_keys_means_no_authentication() {
        assert_eq!(Access::new(vec![]).authenticate(None), Ok(None));
    }

    #[test]
    fn missing_and_wrong_keys_are_told_apart() {
        let a = Access::new(vec![key("sk-a", None, None, None)]);
        assert_eq!(a.authenticate(None), Err(Refusal::Missing));
        assert_eq!(a.authenticate(Some("Basic x")), Err(Refusal::Missing));
        assert_eq!(a.authenticate(Some("Bearer sk-b")), Err(Refusal::Wrong));
        assert_eq!(a.authenticate(Some("Bearer sk-a")), Ok(Some(KeyId(0))));
        assert_eq!(a.name(KeyId(0)), "name-sk-a");
    }

    #[test]
    fn a_key_may_use_only_its_models() {
        let a = Access::new(vec![key("k", None, None, Some(vec!["tiny"]))]);
        assert!(a.allows(KeyId(0), "tiny"));
        assert!(!a.allows(KeyId(0), "big"));
    }

    #[test]
    fn request_limits_refill_over_the_minute_and_say_when_to_retry() {
        let mut a = Access::new(vec![key("k", Some(2), None, None)]);
        let id = KeyId(0);
        assert_eq!(a.admit(id, 0, 0.0), Ok(()));
        assert_eq!(a.admit(id, 0, 0.0), Ok(()));
        assert_eq!(
            a.admit(id, 0, 0.0),
            Err(Refusal::Requests { retry_after: 30 })
        );
        assert_eq!(a.admit(id, 0, 30.0), Ok(()));
    }

    #[test]
    fn token_limits_refuse_without_taking_and_never_admit_an_oversized_request() {
        let mut a = Access::new(vec![key("k", Some(10), Some(100), None)]);
        let id = KeyId(0);
        assert_eq!(a.admit(id, 80, 0.0), Ok(()));
        assert_eq!(
            a.admit(id, 40, 0.0),
            Err(Refusal::Tokens {
                retry_after: Some(12)
            })
        );
        assert_eq!(a.admit(id, 20, 0.0), Ok(()), "the refusal took nothing");
        assert_eq!(
            a.admit(id, 101, 600.0),
            Err(Refusal::Tokens { retry_after: None })
        );
    }
}
