//! Configuration: `config/buildbus.toml` (compiled in as the default), an optional file
//! given with `--config`, and the overrides that flags and `BUILDBUS_*` variables apply.
//!
//! The file says where the Pulse fields (tree, platform, buildtype, product, revision,
//! branch, tags) come from for each build system, which values are secrets, and the
//! limits on input. Unknown keys are an error, so a typo never silently does nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The built-in default configuration (the example file in `config/`).
pub const DEFAULT_TOML: &str = include_str!("../config/buildbus.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config {path}: [redaction] pattern {pattern:?}: {message}")]
    Pattern {
        path: String,
        pattern: String,
        message: String,
    },
}

/// Fixed Pulse values (from `[fields]`, env or flags). `None` means "derive it".
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FieldValues {
    pub tree: Option<String>,
    pub platform: Option<String>,
    pub buildtype: Option<String>,
    pub product: Option<String>,
    pub revision: Option<String>,
    pub branch: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

impl FieldValues {
    /// `other`'s values win where set; tags are added.
    pub fn overlay(&mut self, other: &FieldValues) {
        let pick = |mine: &mut Option<String>, theirs: &Option<String>| {
            if let Some(v) = theirs {
                *mine = Some(v.clone());
            }
        };
        pick(&mut self.tree, &other.tree);
        pick(&mut self.platform, &other.platform);
        pick(&mut self.buildtype, &other.buildtype);
        pick(&mut self.product, &other.product);
        pick(&mut self.revision, &other.revision);
        pick(&mut self.branch, &other.branch);
        for t in &other.tags {
            if !self.tags.contains(t) {
                self.tags.push(t.clone());
            }
        }
    }
}

/// Ordered rules per Pulse field (see the comments in `config/buildbus.toml`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeriveRules {
    #[serde(default)]
    pub tree: Vec<String>,
    #[serde(default)]
    pub platform: Vec<String>,
    #[serde(default)]
    pub buildtype: Vec<String>,
    #[serde(default)]
    pub product: Vec<String>,
    #[serde(default)]
    pub revision: Vec<String>,
    #[serde(default)]
    pub branch: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

impl DeriveRules {
    /// Every rule of every field.
    pub fn all(&self) -> impl Iterator<Item = &str> {
        [
            &self.tree,
            &self.platform,
            &self.buildtype,
            &self.product,
            &self.revision,
            &self.branch,
            &self.tags,
        ]
        .into_iter()
        .flatten()
        .map(String::as_str)
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SystemConfig {
    #[serde(default)]
    pub derive: DeriveRules,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RedactionConfig {
    #[serde(default)]
    pub options: Vec<String>,
    #[serde(default)]
    pub key_patterns: Vec<String>,
    #[serde(default)]
    pub value_patterns: Vec<String>,
}

impl RedactionConfig {
    /// Compiles every pattern once, so that a bad one is a configuration error naming
    /// `path`, the pattern and the reason, never a redaction that silently does less.
    pub fn check(&self, path: &str) -> Result<(), ConfigError> {
        for pattern in self.key_patterns.iter().chain(&self.value_patterns) {
            if let Err(e) = regex::Regex::new(pattern) {
                return Err(ConfigError::Pattern {
                    path: path.to_string(),
                    pattern: pattern.clone(),
                    message: e.to_string(),
                });
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: u64,
}

fn default_max_event_bytes() -> u64 {
    64 << 20
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_event_bytes: default_max_event_bytes(),
        }
    }
}

/// Where the bus is.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    #[serde(default = "default_url")]
    pub url: String,
    #[serde(default = "default_prefix")]
    pub exchange_prefix: String,
    /// PEM file of CA certificates trusted, besides the system's, for `amqps` URLs.
    /// Relative paths are relative to the configuration file's folder.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate, for brokers that require one.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

fn default_url() -> String {
    "amqp://guest:guest@127.0.0.1:5672/%2f".to_string()
}

fn default_prefix() -> String {
    crate::model::DEFAULT_EXCHANGE_PREFIX.to_string()
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            url: default_url(),
            exchange_prefix: default_prefix(),
            ca_file: None,
            client_cert: None,
            client_key: None,
        }
    }
}

/// The whole configuration.
///
/// Besides `[fields]`, `[redaction]`, `[limits]` and `[bus]`, every top-level table is
/// a build system's, named as the system is registered (`[bazel.derive]`,
/// `[bitbake.derive]`): this file does not list the systems. Which names are real is
/// checked against the registry ([`Config::check_systems`], called when the
/// translation context is built), so a misspelt table is still an error.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Config {
    #[serde(default)]
    pub fields: FieldValues,
    #[serde(default)]
    pub redaction: RedactionConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub bus: BusConfig,
    /// Each build system's table, by system name.
    #[serde(flatten)]
    pub systems: BTreeMap<String, SystemConfig>,
    /// Where this configuration came from (for errors).
    #[serde(skip)]
    pub origin: String,
}

impl Config {
    /// The built-in defaults.
    ///
    /// The compiled-in file is part of the program and a unit test parses it, so it
    /// cannot fail at run time; if it ever did, falling back to an empty configuration
    /// would silently drop the redaction rules, so this stops instead.
    pub fn builtin() -> Config {
        match Config::parse(DEFAULT_TOML, "<built-in>") {
            Ok(c) => c,
            Err(e) => panic!("the compiled-in config/buildbus.toml is invalid: {e}"),
        }
    }

    /// Parses a configuration file. It is laid over the built-in defaults: a table it
    /// leaves out, or a key it does not set, keeps its default; a list it sets replaces
    /// the default list.
    pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
        let perr = |e: toml::de::Error| ConfigError::Parse {
            path: path.to_string(),
            message: e.to_string(),
        };
        let mut base: toml::Table = toml::from_str(DEFAULT_TOML).map_err(perr)?;
        let user: toml::Table = toml::from_str(text).map_err(perr)?;
        merge(&mut base, user);
        let mut cfg: Config = toml::Value::Table(base).try_into().map_err(perr)?;
        cfg.origin = path.to_string();
        // Validate patterns now, so a bad one is reported with the file it came from.
        cfg.redaction.check(path)?;
        Ok(cfg)
    }

    /// A build system's table (its derivation rules); empty when the file has none.
    pub fn system(&self, name: &str) -> &SystemConfig {
        static NONE: std::sync::LazyLock<SystemConfig> =
            std::sync::LazyLock::new(SystemConfig::default);
        self.systems.get(name).unwrap_or(&NONE)
    }

    /// Every build system's table must name a registered system (`known`).
    pub fn check_systems(&self, known: &[&str]) -> Result<(), ConfigError> {
        match self.systems.keys().find(|k| !known.contains(&k.as_str())) {
            None => Ok(()),
            Some(unknown) => Err(ConfigError::Parse {
                path: self.origin.clone(),
                message: format!(
                    "unknown table [{unknown}]: not fields, redaction, limits, bus nor a build \
                     system ({})",
                    known.join(", ")
                ),
            }),
        }
    }

    /// Reads `path`, or returns the built-in defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            None => Ok(Config::builtin()),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                let mut cfg = Config::parse(&text, &p.display().to_string())?;
                // The TLS files are relative to the configuration file's folder.
                let dir = p.parent().unwrap_or(Path::new(""));
                for f in [
                    &mut cfg.bus.ca_file,
                    &mut cfg.bus.client_cert,
                    &mut cfg.bus.client_key,
                ]
                .into_iter()
                .flatten()
                {
                    if f.is_relative() {
                        *f = dir.join(&*f);
                    }
                }
                Ok(cfg)
            }
        }
    }
}

/// Lays `top` over `base`, table by table.
fn merge(base: &mut toml::Table, top: toml::Table) {
    for (k, v) in top {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => merge(b, t),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_parses_with_rules() {
        let c = Config::parse(DEFAULT_TOML, "builtin").unwrap();
        assert_eq!(
            c.system("bazel").derive.revision[0],
            "status:BUILD_SCM_REVISION"
        );
        assert!(!c.system("bitbake").derive.tree.is_empty());
        assert!(c.check_systems(&["bazel", "bitbake"]).is_ok());
        assert!(c.redaction.options.contains(&"client_env".to_string()));
        assert_eq!(c.limits.max_event_bytes, 64 << 20);
    }

    #[test]
    fn a_file_overrides_only_what_it_says() {
        let c = Config::parse("[bazel.derive]\ntree = [\"literal:x\"]\n", "f.toml").unwrap();
        assert_eq!(c.system("bazel").derive.tree, vec!["literal:x"]);
        assert_eq!(
            c.system("bazel").derive.platform,
            Config::builtin().system("bazel").derive.platform
        );
        assert_eq!(c.redaction, Config::builtin().redaction);
    }

    #[test]
    fn typos_and_bad_patterns_are_errors() {
        let e = Config::parse("[fields]\ntre = \"x\"\n", "f.toml").unwrap_err();
        assert!(e.to_string().contains("f.toml"), "{e}");
        // A misspelt build system's table parses (the registry is above this
        // module) and is refused against the registry's names.
        let c = Config::parse("[bazle.derive]\ntree = [\"literal:x\"]\n", "h.toml").unwrap();
        let e = c.check_systems(&["bitbake", "bazel"]).unwrap_err();
        assert!(
            e.to_string().contains("h.toml") && e.to_string().contains("[bazle]"),
            "{e}"
        );
        let e = Config::parse("[bazel.derive]\ntre = [\"x\"]\n", "i.toml").unwrap_err();
        assert!(e.to_string().contains("i.toml"), "{e}");
        let e = Config::parse("[redaction]\nkey_patterns = [\"(\"]\n", "g.toml").unwrap_err();
        assert!(
            e.to_string().contains("g.toml") && e.to_string().contains("\"(\""),
            "{e}"
        );
    }

    #[test]
    fn overlay_prefers_the_other_side() {
        let mut a = FieldValues {
            tree: Some("a".into()),
            tags: vec!["x".into()],
            ..Default::default()
        };
        a.overlay(&FieldValues {
            tree: Some("b".into()),
            platform: Some("p".into()),
            tags: vec!["x".into(), "y".into()],
            ..Default::default()
        });
        assert_eq!(a.tree.as_deref(), Some("b"));
        assert_eq!(a.platform.as_deref(), Some("p"));
        assert_eq!(a.tags, vec!["x", "y"]);
    }
}
