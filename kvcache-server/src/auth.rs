//! Who may use the data plane (`--auth FILE`): tenants, their tokens, and what each connection
//! is allowed.
//!
//! The file lists tenants; it is read at start and again on SIGHUP (a file that fails to load
//! keeps the tenants already loaded, with an error in the log):
//!
//! ```toml
//! [[tenant]]
//! name = "team-a"
//! tokens = ["a-secret"]   # one or more; rotate by adding the new one, then removing the old
//! admin = false           # admin tenants may list keys and warm nodes
//! shared_memory = true     # may map the pool over the shared-memory socket (default true)
//! ```
//!
//! A process that maps the pool can read every byte in it, whichever tenant stored it (not
//! the keys, which stay on the node). Tenants that must not read each other's KV even on one
//! host get `shared_memory = false`: their same-host clients then use TCP.
//!
//! Every connection presents a token in its first frame (`Hello`). A regular tenant's keys are
//! folded with its name ([`kvcache_core::tenant`]), so it has a key space of its own. An admin
//! tenant works in the node's raw key space, where the folded keys of every tenant live: it
//! lists keys and copies blocks between nodes (warming), and it can read every tenant's blocks.
//! Without `--auth` every connection works in the raw space, as an admin would.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};
use kvcache_core::BlockKey;
use kvcache_core::tenant::TenantFold;
use parking_lot::RwLock;
use serde::Deserialize;

/// One tenant of the auth file.
#[derive(Debug)]
pub struct Tenant {
    pub name: String,
    pub admin: bool,
    /// May attach over the shared-memory socket (and so read the whole pool).
    pub shared_memory: bool,
    fold: TenantFold,
}

/// The tenants of one version of the auth file, by token.
#[derive(Debug, Default)]
pub struct Tenants {
    by_token: HashMap<[u8; 32], Arc<Tenant>>,
    /// A token of the first admin tenant: the node's own credential towards its peers.
    admin_token: Option<String>,
    count: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tenant: Vec<TenantEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    name: String,
    tokens: Vec<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default = "yes")]
    shared_memory: bool,
}

fn yes() -> bool {
    true
}

/// Tokens are compared by digest: the map never holds them, and lookups take the same time
/// whatever prefix a guess shares with a real token.
fn digest(token: &str) -> [u8; 32] {
    *blake3::hash(token.as_bytes()).as_bytes()
}

/// Shortest token accepted: tokens are secrets, not passwords a person types.
const MIN_TOKEN_LEN: usize = 16;

impl Tenants {
    /// Parses and checks an auth file's text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: File = toml::from_str(text)?;
        if file.tenant.is_empty() {
            bail!("no [[tenant]] entries: every connection would be refused");
        }
        let mut out = Tenants::default();
        let mut names = std::collections::HashSet::new();
        for t in file.tenant {
            let name = t.name.trim();
            if name.is_empty() || name != t.name || name.chars().any(char::is_control) {
                bail!(
                    "tenant name {:?} must be non-empty, without surrounding spaces or control characters",
                    t.name
                );
            }
            if !names.insert(t.name.clone()) {
                bail!("tenant {:?} is listed twice", t.name);
            }
            if t.tokens.is_empty() {
                bail!("tenant {:?} has no tokens", t.name);
            }
            let tenant = Arc::new(Tenant {
                fold: TenantFold::new(&t.name),
                name: t.name.clone(),
                admin: t.admin,
                shared_memory: t.shared_memory,
            });
            for token in &t.tokens {
                if token.is_empty() {
                    bail!("tenant {:?} has an empty token", t.name);
                }
                if token.chars().count() < MIN_TOKEN_LEN {
                    tracing::warn!(
                        tenant = %t.name,
                        "a token is shorter than {MIN_TOKEN_LEN} characters: use a random secret \
                         (e.g. `openssl rand -hex 32`)"
                    );
                }
                if out
                    .by_token
                    .insert(digest(token), Arc::clone(&tenant))
                    .is_some()
                {
                    bail!("a token of tenant {:?} is listed twice", t.name);
                }
                if t.admin && out.admin_token.is_none() {
                    out.admin_token = Some(token.clone());
                }
            }
            out.count += 1;
        }
        Ok(out)
    }

    fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the auth file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid auth file {}", path.display()))
    }

    /// The tenant a token belongs to.
    pub fn find(&self, token: &str) -> Option<&Arc<Tenant>> {
        self.by_token.get(&digest(token))
    }

    /// Tenants in the file.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Never true for a loaded file: one without tenants is refused.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Authentication of one node: the auth file's current tenants, or none (an open data plane).
#[derive(Debug, Default)]
pub struct Auth {
    path: Option<PathBuf>,
    tenants: RwLock<Arc<Tenants>>,
    /// Bumped on every reload, so connections re-check their token.
    generation: AtomicU64,
}

impl Auth {
    /// An open data plane: no tokens, every connection in the raw key space.
    pub fn open() -> Self {
        Self::default()
    }

    /// Loads `path`; an error if it does not load.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            tenants: RwLock::new(Arc::new(Tenants::load(path)?)),
            path: Some(path.to_path_buf()),
            generation: AtomicU64::new(0),
        })
    }

    /// Whether connections must present a token.
    pub fn required(&self) -> bool {
        self.path.is_some()
    }

    /// The auth file, when there is one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Reads the file again; on failure the tenants already loaded stay.
    pub fn reload(&self) -> anyhow::Result<usize> {
        let Some(path) = &self.path else {
            return Ok(0);
        };
        let tenants = Tenants::load(path)?;
        let n = tenants.len();
        *self.tenants.write() = Arc::new(tenants);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(n)
    }

    /// Tenants now loaded.
    pub fn tenants(&self) -> Arc<Tenants> {
        Arc::clone(&self.tenants.read())
    }

    /// A token of an admin tenant, for the node's own calls to its peers (warming).
    pub fn admin_token(&self) -> Option<String> {
        self.tenants.read().admin_token.clone()
    }

    /// What a `Hello` with `token` grants, or `None` for a token the node does not know.
    pub fn grant(&self, token: &str) -> Option<Access> {
        if !self.required() {
            return Some(Access::open());
        }
        let generation = self.generation.load(Ordering::Acquire);
        let tenant = Arc::clone(self.tenants.read().find(token)?);
        Some(Access {
            state: State::Tenant {
                tenant,
                token: digest(token),
                generation,
            },
        })
    }

    /// Whether `access` still holds after reloads (its token may have been removed since it was
    /// granted); a token still listed is refreshed in place, so the check is one atomic load
    /// until the next reload.
    pub fn recheck(&self, access: &mut Access) -> bool {
        let State::Tenant {
            token, generation, ..
        } = &access.state
        else {
            return true;
        };
        let now = self.generation.load(Ordering::Acquire);
        if *generation == now {
            return true;
        }
        let token = *token;
        let found = self.tenants.read().by_token.get(&token).map(Arc::clone);
        match found {
            Some(tenant) => {
                access.state = State::Tenant {
                    tenant,
                    token,
                    generation: now,
                };
                true
            }
            None => false,
        }
    }

    /// How a new connection starts: unauthenticated when tokens are required.
    pub fn initial(&self) -> Access {
        if self.required() {
            Access {
                state: State::Unauthenticated,
            }
        } else {
            Access::open()
        }
    }
}

/// What one connection may do, and in which key space.
#[derive(Clone, Debug)]
pub struct Access {
    state: State,
}

#[derive(Clone, Debug)]
enum State {
    /// No `--auth`: the raw key space, everything allowed.
    Open,
    /// `--auth` and no valid `Hello` yet: nothing but `Hello`.
    Unauthenticated,
    Tenant {
        tenant: Arc<Tenant>,
        token: [u8; 32],
        generation: u64,
    },
}

impl Access {
    /// The access of a node without `--auth`.
    pub fn open() -> Self {
        Self { state: State::Open }
    }

    /// Whether the connection may make requests.
    pub fn authenticated(&self) -> bool {
        !matches!(self.state, State::Unauthenticated)
    }

    /// Whether it may list keys (and so warm another node).
    pub fn admin(&self) -> bool {
        match &self.state {
            State::Open => true,
            State::Unauthenticated => false,
            State::Tenant { tenant, .. } => tenant.admin,
        }
    }

    /// Whether it may map the pool over the shared-memory socket.
    pub fn shared_memory(&self) -> bool {
        match &self.state {
            State::Open => true,
            State::Unauthenticated => false,
            State::Tenant { tenant, .. } => tenant.shared_memory,
        }
    }

    /// The tenant's name, for logs and the `Hello` reply.
    pub fn tenant(&self) -> Option<&str> {
        match &self.state {
            State::Tenant { tenant, .. } => Some(&tenant.name),
            _ => None,
        }
    }

    /// Where the key a client sent lives on this node.
    pub fn fold(&self, key: BlockKey) -> BlockKey {
        match &self.state {
            State::Tenant { tenant, .. } if !tenant.admin => tenant.fold.fold(key),
            _ => key,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        [[tenant]]
        name = "team-a"
        tokens = ["a-secret-0123456789", "a-rotated-0123456789"]

        [[tenant]]
        name = "ops"
        tokens = ["ops-secret-0123456789"]
        admin = true
    "#;

    #[test]
    fn tokens_map_to_tenants_and_tenants_get_their_own_key_space() {
        let t = Tenants::parse(FILE).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.find("a-secret-0123456789").unwrap().name, "team-a");
        assert_eq!(t.find("a-rotated-0123456789").unwrap().name, "team-a");
        assert!(t.find("a-secret-012345678").is_none());
        assert_eq!(t.admin_token.as_deref(), Some("ops-secret-0123456789"));
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (text, why) in [
            ("", "no [[tenant]]"),
            ("[[tenant]]\nname = \"a\"\ntokens = []\n", "no tokens"),
            ("[[tenant]]\nname = \"a\"\ntokens = [\"\"]\n", "empty token"),
            (
                "[[tenant]]\nname = \"a\"\ntokens = [\"0123456789abcdefg\"]\n[[tenant]]\nname = \"a\"\ntokens = [\"0123456789abcdefh\"]\n",
                "listed twice",
            ),
            (
                "[[tenant]]\nname = \"a\"\ntokens = [\"0123456789abcdefg\"]\n[[tenant]]\nname = \"b\"\ntokens = [\"0123456789abcdefg\"]\n",
                "token of tenant \"b\" is listed twice",
            ),
            (
                "[[tenant]]\nname = \"a\"\ntokens = [\"0123456789abcdefg\"]\nadmn = true\n",
                "unknown field",
            ),
            (
                "[[tenant]]\nname = \" a\"\ntokens = [\"0123456789abcdefg\"]\n",
                "surrounding spaces",
            ),
        ] {
            let err = format!("{:#}", Tenants::parse(text).unwrap_err());
            assert!(err.contains(why), "{text:?}: {err}");
        }
    }

    #[test]
    fn a_reload_that_removes_a_token_revokes_connections_using_it() {
        let dir = std::env::temp_dir().join(format!("kvcache-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("auth.toml");
        std::fs::write(&path, FILE).unwrap();
        let auth = Auth::from_file(&path).unwrap();
        assert!(!auth.initial().authenticated());
        assert!(auth.grant("wrong-token-0123456789").is_none());
        let mut old = auth.grant("a-secret-0123456789").unwrap();
        let mut kept = auth.grant("a-rotated-0123456789").unwrap();
        assert!(!old.admin() && auth.grant("ops-secret-0123456789").unwrap().admin());
        std::fs::write(&path, FILE.replace("\"a-secret-0123456789\", ", "")).unwrap();
        assert_eq!(auth.reload().unwrap(), 2);
        assert!(!auth.recheck(&mut old), "removed token");
        assert!(auth.recheck(&mut kept), "kept token");
        // A broken file keeps what was loaded.
        std::fs::write(&path, "[[tenant]]\n").unwrap();
        assert!(auth.reload().is_err());
        assert!(auth.grant("a-rotated-0123456789").is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn admins_and_open_nodes_use_raw_keys_and_tenants_fold() {
        let t = Tenants::parse(FILE).unwrap();
        let k = BlockKey(42);
        let tenant = |token: &str| Access {
            state: State::Tenant {
                tenant: Arc::clone(t.find(token).unwrap()),
                token: digest(token),
                generation: 0,
            },
        };
        assert_eq!(Access::open().fold(k), k);
        assert_eq!(tenant("ops-secret-0123456789").fold(k), k);
        assert_eq!(
            tenant("a-secret-0123456789").fold(k),
            TenantFold::new("team-a").fold(k)
        );
    }
}
