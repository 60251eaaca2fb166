//! `container_config(plan, …) → ContainerCreateBody`: the bottle in Docker's terms,
//! as a pure function so a snapshot test can review it without a daemon.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::models::{ContainerCreateBody, DeviceMapping, HostConfig};
use bot_bottle_core::plan::{
    BOTTLE_RUN_DIR, BOTTLE_SHIM_PATH, BottlePlan, GATEWAY_SOCKET, PROXY_PORT, Workspace,
};
use bot_bottle_core::provider::{AGENT_HOME, BOTTLE_CA_PATH, SYSTEM_CA_BUNDLE, WORKSPACE};

use crate::tripwire::{TRIPWIRE_RUN_DIR, TRIPWIRE_SOCKET};

/// Label keys; `ps` and cleanup find bottles by them after a crash.
pub const LABEL_MANAGED: &str = "dev.bot-bottle.managed";
pub const LABEL_SLUG: &str = "dev.bot-bottle.slug";
pub const LABEL_AGENT: &str = "dev.bot-bottle.agent";
pub const LABEL_KIND: &str = "dev.bot-bottle.kind";
/// [`LABEL_KIND`] values of containers.
pub const KIND_BOTTLE: &str = "bottle";
pub const KIND_TRIPWIRE: &str = "tripwire";

/// Default pid limit when the bottle sets none: enough for npm and a build, not for a
/// fork bomb.
pub const DEFAULT_PIDS_LIMIT: i64 = 4096;

/// Host paths the container needs besides the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPaths {
    /// `state/<slug>/run`, mounted at `/run/bot-bottle`.
    pub run_dir: PathBuf,
    /// The static bot-bottle binary, mounted read-only as the shim.
    pub shim_binary: PathBuf,
    /// `state/<slug>/trust`: `gateway-ca.pem` and `ca-bundle.pem` (the image's system roots
    /// plus the gateway CA), mounted read-only over their places in the bottle.
    pub trust_dir: PathBuf,
}

/// Where the shim finds the files to place in the agent's home (`run/home` on the host).
pub const BOTTLE_PROVISION_DIR: &str = "/run/bot-bottle/home";
/// File names inside [`HostPaths::trust_dir`].
pub const TRUST_CA_FILE: &str = "gateway-ca.pem";
pub const TRUST_BUNDLE_FILE: &str = "ca-bundle.pem";

/// Whose network namespace the bottle gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// Its own, with loopback only: a direct attempt fails in the bottle's kernel, unaudited.
    Sealed,
    /// The tripwire container's (by id): loopback, plus a TUN default route whose every
    /// packet is refused and audited (see `tripwire.rs`).
    Tripwire(String),
}

/// Extra environment computed at launch (credential placeholders). Never secrets.
pub type LaunchEnv = Vec<(String, String)>;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "invalid memory size `{value}`\nhint: use a number with an optional unit, e.g. `512m` or `4g`"
    )]
    Memory { value: String },
    #[error(
        "mount source `{path}` does not exist\nhint: create it, or fix `mounts:` in the bottle manifest"
    )]
    MountSource { path: PathBuf },
}

/// Parses `512m`, `4g`, `1024k` or bytes.
pub fn parse_memory(value: &str) -> Result<i64, ConfigError> {
    let err = || ConfigError::Memory {
        value: value.to_owned(),
    };
    let text = value.trim().to_ascii_lowercase();
    let text = text.strip_suffix('b').unwrap_or(&text);
    let (digits, multiplier) = match text.chars().last() {
        Some('k') => (&text[..text.len() - 1], 1i64 << 10),
        Some('m') => (&text[..text.len() - 1], 1 << 20),
        Some('g') => (&text[..text.len() - 1], 1 << 30),
        Some('t') => (&text[..text.len() - 1], 1 << 40),
        _ => (text, 1),
    };
    let number: f64 = digits.trim().parse().map_err(|_| err())?;
    if !(number.is_finite() && number > 0.0) {
        return Err(err());
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
    let bytes = (number * multiplier as f64) as i64;
    Ok(bytes)
}

fn bind(source: &Path, target: &str, readonly: bool) -> String {
    let mode = if readonly { "ro" } else { "rw" };
    format!("{}:{target}:{mode}", source.display())
}

/// The container for one bottle session.
pub fn container_config(
    plan: &BottlePlan,
    slug: &str,
    image: &str,
    paths: &HostPaths,
    launch_env: &LaunchEnv,
    network: &Network,
) -> Result<ContainerCreateBody, ConfigError> {
    let mut entrypoint = vec![
        BOTTLE_SHIM_PATH.to_owned(),
        "shim".to_owned(),
        "--forward".to_owned(),
        format!("{PROXY_PORT}={BOTTLE_RUN_DIR}/{GATEWAY_SOCKET}"),
    ];
    for forward in &plan.forwards {
        entrypoint.push("--forward".to_owned());
        entrypoint.push(format!("{}={}", forward.port, forward.socket));
    }
    entrypoint.extend([
        "--provision".to_owned(),
        format!("{BOTTLE_PROVISION_DIR}:{AGENT_HOME}"),
        "--".to_owned(),
    ]);
    entrypoint.extend(plan.argv.iter().cloned());

    // One value per name, launch values (placeholders) winning: with a name twice in the
    // list, glibc's getenv would return the first, the bottle's own `env:` value.
    let mut merged = plan.env.clone();
    merged.extend(launch_env.iter().cloned());
    let env: Vec<String> = merged.iter().map(|(k, v)| format!("{k}={v}")).collect();

    let mut binds = vec![
        // Read-only: the agent connects to the sockets in it but must not create files
        // there, even when its uid owns the directory (a laptop, where it is the user's).
        bind(&paths.run_dir, BOTTLE_RUN_DIR, true),
        bind(&paths.shim_binary, BOTTLE_SHIM_PATH, true),
        // Mounted, not copied in: the trust store is root's and read-only to the agent, and
        // mounts are never part of a frozen image.
        bind(&paths.trust_dir.join(TRUST_CA_FILE), BOTTLE_CA_PATH, true),
        bind(
            &paths.trust_dir.join(TRUST_BUNDLE_FILE),
            SYSTEM_CA_BUNDLE,
            true,
        ),
    ];
    if let Workspace::Bind { host } = &plan.workspace {
        binds.push(bind(host, WORKSPACE, false));
    }
    for mount in &plan.mounts {
        binds.push(bind(
            &mount.source,
            &mount.target.to_string_lossy(),
            mount.readonly,
        ));
    }

    let memory = plan
        .resources
        .memory
        .as_deref()
        .map(parse_memory)
        .transpose()?;
    #[allow(clippy::cast_possible_truncation)]
    let nano_cpus = plan.resources.cpus.map(|cpus| (cpus * 1e9) as i64);

    let labels = HashMap::from([
        (LABEL_MANAGED.to_owned(), "1".to_owned()),
        (LABEL_SLUG.to_owned(), slug.to_owned()),
        (LABEL_AGENT.to_owned(), plan.agent.clone()),
        (LABEL_KIND.to_owned(), KIND_BOTTLE.to_owned()),
    ]);

    let interactive = !plan.headless;
    let (network_mode, hostname) = match network {
        Network::Sealed => ("none".to_owned(), Some("bottle".to_owned())),
        // The namespace's owner names the host (Docker refuses a hostname here).
        Network::Tripwire(id) => (format!("container:{id}"), None),
    };
    Ok(ContainerCreateBody {
        image: Some(image.to_owned()),
        hostname,
        user: Some(format!("{0}:{0}", plan.agent_uid)),
        entrypoint: Some(entrypoint),
        cmd: Some(Vec::new()),
        env: Some(env),
        working_dir: Some(WORKSPACE.to_owned()),
        labels: Some(labels),
        tty: Some(interactive),
        open_stdin: Some(interactive),
        stdin_once: Some(interactive),
        attach_stdin: Some(interactive),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        network_disabled: Some(false),
        host_config: Some(HostConfig {
            // No interface but loopback (and the tripwire's, which leads nowhere): the
            // gateway socket is the only way out.
            network_mode: Some(network_mode),
            cap_drop: Some(vec!["ALL".to_owned()]),
            security_opt: Some(vec!["no-new-privileges:true".to_owned()]),
            binds: Some(binds),
            memory,
            memory_swap: memory,
            nano_cpus,
            pids_limit: Some(plan.resources.pids.unwrap_or(DEFAULT_PIDS_LIMIT)),
            // The shim is PID 1 and reaps; Docker's own init would sit in front of it.
            init: Some(false),
            ipc_mode: Some("private".to_owned()),
            ..HostConfig::default()
        }),
        ..ContainerCreateBody::default()
    })
}

/// The tripwire's container: it owns the network namespace the bottle joins, holds its
/// TUN device, and runs nothing but `bot-bottle tripwire` (mounted like the shim). Root,
/// because configuring a device takes it, with every capability dropped but
/// `CAP_NET_ADMIN`, which reaches no further than this namespace of loopback and a
/// device that leads nowhere. Half a CPU, 64 MiB and 8 pids at most.
#[must_use]
pub fn tripwire_config(
    slug: &str,
    image: &str,
    shim_binary: &Path,
    tripwire_dir: &Path,
) -> ContainerCreateBody {
    let labels = HashMap::from([
        (LABEL_MANAGED.to_owned(), "1".to_owned()),
        (LABEL_SLUG.to_owned(), slug.to_owned()),
        (LABEL_KIND.to_owned(), KIND_TRIPWIRE.to_owned()),
    ]);
    let sysctls = HashMap::from(
        [
            // Docker turns IPv6 off in a namespace without IPv6 networks; the tripwire
            // needs it on to catch IPv6 attempts. No duplicate-address wait for its
            // address: nothing else is on the link.
            ("net.ipv6.conf.all.disable_ipv6", "0"),
            ("net.ipv6.conf.default.disable_ipv6", "0"),
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    ContainerCreateBody {
        image: Some(image.to_owned()),
        hostname: Some("bottle".to_owned()),
        user: Some("0:0".to_owned()),
        entrypoint: Some(vec![
            BOTTLE_SHIM_PATH.to_owned(),
            "tripwire".to_owned(),
            "--socket".to_owned(),
            format!("{TRIPWIRE_RUN_DIR}/{TRIPWIRE_SOCKET}"),
        ]),
        cmd: Some(Vec::new()),
        env: Some(Vec::new()),
        labels: Some(labels),
        attach_stdout: Some(false),
        attach_stderr: Some(false),
        host_config: Some(HostConfig {
            network_mode: Some("none".to_owned()),
            cap_drop: Some(vec!["ALL".to_owned()]),
            cap_add: Some(vec!["NET_ADMIN".to_owned()]),
            security_opt: Some(vec!["no-new-privileges:true".to_owned()]),
            devices: Some(vec![DeviceMapping {
                path_on_host: Some("/dev/net/tun".to_owned()),
                path_in_container: Some("/dev/net/tun".to_owned()),
                cgroup_permissions: Some("rwm".to_owned()),
            }]),
            sysctls: Some(sysctls),
            binds: Some(vec![
                bind(shim_binary, BOTTLE_SHIM_PATH, true),
                bind(tripwire_dir, TRIPWIRE_RUN_DIR, false),
            ]),
            readonly_rootfs: Some(true),
            // It exits when the launcher closes its socket (or dies); nothing to keep.
            auto_remove: Some(true),
            memory: Some(64 << 20),
            memory_swap: Some(64 << 20),
            // A bottle that floods its tripwire burns its own time, not the host's.
            nano_cpus: Some(500_000_000),
            pids_limit: Some(8),
            init: Some(false),
            ipc_mode: Some("private".to_owned()),
            ..HostConfig::default()
        }),
        ..ContainerCreateBody::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512m").unwrap(), 512 << 20);
        assert_eq!(parse_memory("4G").unwrap(), 4 << 30);
        assert_eq!(parse_memory("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_memory("2048").unwrap(), 2048);
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("-1g").is_err());
    }
}

#[cfg(test)]
mod snapshot_tests {
    use std::path::{Path, PathBuf};

    use bot_bottle_core::manifest::{AgentManifest, BottleManifest, Catalog, Origin};
    use bot_bottle_core::plan::{BottleSpec, HostFacts, plan};

    use super::*;

    #[test]
    fn container_config_snapshot() {
        let mut catalog = Catalog::default();
        let agent = AgentManifest::parse(
            Path::new("/p/.bot-bottle/agents/implementer.md"),
            "---\nprovider: claude\nbottles: dev\n---\nWrite code.\n",
        )
        .unwrap();
        let bottle = BottleManifest::parse(
            Path::new("/p/.bot-bottle/bottles/dev.md"),
            "---\negress:\n  rules:\n    - host: api.anthropic.com\nenv: {ANTHROPIC_API_KEY: from-the-manifest}\nresources: {memory: 2g, cpus: 1.5, pids: 256}\nmounts:\n  - source: /data\n    target: /data\n---\n",
        )
        .unwrap();
        catalog
            .agents
            .insert("implementer".into(), (agent, Origin::Project));
        catalog
            .bottles
            .insert("dev".into(), (bottle, Origin::Project));
        let spec = BottleSpec {
            agent: "implementer".into(),
            prompt: Some("Fix the bug".into()),
            cwd: PathBuf::from("/home/me/project"),
            ..BottleSpec::default()
        };
        let host = HostFacts {
            agent_uid: 1000,
            default_backend: "docker".into(),
            ..HostFacts::default()
        };
        let plan = plan(&spec, &catalog, &host).unwrap();
        let paths = HostPaths {
            run_dir: PathBuf::from("/home/me/.bot-bottle/state/implementer-abcde/run"),
            shim_binary: PathBuf::from("/usr/local/bin/bot-bottle"),
            trust_dir: PathBuf::from("/home/me/.bot-bottle/state/implementer-abcde/trust"),
        };
        let env = vec![(
            "ANTHROPIC_API_KEY".to_owned(),
            "sk-ant-api03-PLACEHOLDER".to_owned(),
        )];
        let config = container_config(
            &plan,
            "implementer-abcde",
            "bot-bottle/bottle:0123456789abcdef",
            &paths,
            &env,
            &Network::Tripwire("0123abcd".to_owned()),
        )
        .unwrap();
        let keys: Vec<&String> = config
            .env
            .iter()
            .flatten()
            .filter(|item| item.starts_with("ANTHROPIC_API_KEY="))
            .collect();
        assert_eq!(
            keys,
            ["ANTHROPIC_API_KEY=sk-ant-api03-PLACEHOLDER"],
            "one value, the launch's"
        );
        let value = serde_json::to_value(&config).unwrap();
        insta::assert_json_snapshot!("container_config", sorted_maps(value));
    }

    fn sorted_maps(mut value: serde_json::Value) -> serde_json::Value {
        // Labels and sysctls are HashMaps: sort them for a stable snapshot.
        for pointer in ["/Labels", "/HostConfig/Sysctls"] {
            if let Some(map) = value.pointer_mut(pointer) {
                let sorted: std::collections::BTreeMap<String, serde_json::Value> =
                    serde_json::from_value(map.clone()).unwrap();
                *map = serde_json::to_value(sorted).unwrap();
            }
        }
        value
    }

    #[test]
    fn tripwire_config_snapshot() {
        let config = tripwire_config(
            "implementer-abcde",
            "bot-bottle/bottle:0123456789abcdef",
            Path::new("/usr/local/bin/bot-bottle"),
            Path::new("/home/me/.bot-bottle/state/implementer-abcde/tripwire"),
        );
        insta::assert_json_snapshot!(
            "tripwire_config",
            sorted_maps(serde_json::to_value(&config).unwrap())
        );
    }
}
