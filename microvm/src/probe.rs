//! Can this host's KVM run a guest kernel? On metal, yes. On this project's nested
//! machines (`kvm_pvm`, shadow paging) KVM runs guest CPL3 natively but emulates CPL0 and
//! lacks instructions a kernel needs (ENVIRONMENT.md), so a Linux guest cannot boot there.
//! The answer is cached per boot of the host.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The probe's answer, with the reason to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmVerdict {
    pub can_boot_linux: bool,
    pub reason: String,
}

/// Probes once per process, and once per host boot through a cache file.
pub fn kvm() -> &'static KvmVerdict {
    static VERDICT: OnceLock<KvmVerdict> = OnceLock::new();
    VERDICT.get_or_init(|| {
        let cache = cache_file();
        if let Some(cached) = cache.as_deref().and_then(read_cache) {
            return cached;
        }
        let verdict = probe(Path::new("/dev/kvm"), Path::new("/sys/module"));
        if let Some(path) = cache {
            let line = format!("{}\n{}\n", verdict.can_boot_linux, verdict.reason);
            let _ = std::fs::write(path, line);
        }
        verdict
    })
}

fn probe(kvm_dev: &Path, modules: &Path) -> KvmVerdict {
    let verdict = |ok: bool, reason: &str| KvmVerdict {
        can_boot_linux: ok,
        reason: reason.to_string(),
    };
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm_dev)
    {
        return verdict(
            false,
            &format!("{} cannot be opened: {e}", kvm_dev.display()),
        );
    }
    if modules.join("kvm_pvm").exists() {
        return verdict(
            false,
            "KVM here is nested PVM (kvm_pvm, shadow paging): guest ring 0 is emulated and cannot run a Linux kernel",
        );
    }
    verdict(true, "hardware KVM")
}

fn cache_file() -> Option<PathBuf> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(std::env::temp_dir().join(format!("kindling-kvm-probe-{}", boot_id.trim())))
}

fn read_cache(path: &Path) -> Option<KvmVerdict> {
    let text = std::fs::read_to_string(path).ok()?;
    let (ok, reason) = text.split_once('\n')?;
    Some(KvmVerdict {
        can_boot_linux: ok.parse().ok()?,
        reason: reason.trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_kvm_device_or_nested_pvm_cannot_boot_linux() {
        let dir = std::env::temp_dir().join(format!("kindling-probe-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("modules/kvm_pvm")).unwrap();
        let missing = probe(&dir.join("no-kvm"), &dir.join("modules"));
        assert!(!missing.can_boot_linux && missing.reason.contains("cannot be opened"));
        let null = Path::new("/dev/null"); // opens like a device node
        let pvm = probe(null, &dir.join("modules"));
        assert!(!pvm.can_boot_linux && pvm.reason.contains("kvm_pvm"));
        std::fs::remove_dir_all(dir.join("modules/kvm_pvm")).unwrap();
        assert!(probe(null, &dir.join("modules")).can_boot_linux);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
