//! Chooses how each function is isolated and which hypervisor runs its microVMs, builds
//! the scheduler's launchers, and readies the code of functions created through the
//! control plane (the [`Deployer`]) the way functions.toml's code is readied.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use async_trait::async_trait;
use kindling_images::{
    build_code_image, build_initramfs, build_kernel, build_layers_image, build_root_image,
    CodeError, ImagesManifest, KernelKind, RootPaths, Runtime,
};
use kindling_microvm::kindling::KindlingVmm;
use kindling_microvm::qemu::{self, Accel, Qemu};
use kindling_microvm::{probe, Backend, BootFiles, ImageSource, MicroVmLauncher};
use kindling_network::Network;
use kindling_runtime_api::config::{FunctionConfig, Hypervisor};
use kindling_runtime_api::{
    DeployError, Deployer, Environment, EnvironmentSpec, Function, Isolation, Launcher,
};
use kindling_sandbox::{SandboxLauncher, SandboxOptions};

use crate::images::open_cache;

/// The scheduler's launchers, one for each isolation in use.
pub type Launchers = HashMap<Isolation, Arc<dyn Launcher>>;

/// What [`prepare`] makes ready.
pub struct Prepared {
    pub functions: Vec<Function>,
    pub launchers: Launchers,
    pub deployer: Arc<dyn Deployer>,
    /// The isolation of functions created through the API: the one asked for, or the
    /// sandbox where no hypervisor can run a guest and none was asked for.
    pub default_isolation: Isolation,
}

/// The functions, a launcher for each isolation they use (and for `default_isolation`,
/// which functions created through the API get), and the deployer of their code.
/// With `images`, guests boot the images it names; without, those of the image cache.
/// With `network`, environments of functions with `network = "outbound"` get one.
pub fn prepare(
    configs: Vec<FunctionConfig>,
    hypervisor_override: Option<Hypervisor>,
    images: Option<ImagesManifest>,
    state_dir: &Path,
    default_isolation: Option<Isolation>,
    network: Option<Arc<Network>>,
) -> anyhow::Result<Prepared> {
    // Every environment's start moves processes between cgroups.
    if let Err(why) = kindling_plumbing::favordynmods::enable() {
        tracing::info!(%why, "cgroup migrations stay slow (no favordynmods)");
    }
    let mut launchers = Launchers::new();
    let images = Arc::new(ImageCache {
        manifest: images,
        ..ImageCache::default()
    });
    let mut microvm = MicroVmLauncher::new(
        images.clone(),
        state_dir.join("logs"),
        state_dir.join("snapshots"),
    );
    if let Some(network) = &network {
        microvm.set_network(network.clone());
    }
    let sandboxes = Arc::new(SandboxByRuntime {
        images,
        roots: Mutex::default(),
        network,
    });
    let mut functions = Vec::new();
    let no_microvm = why_no_microvm();
    let default_isolation = match (default_isolation, &no_microvm) {
        (Some(asked), _) => asked,
        (None, Some(why)) => {
            eprintln!("kindling: functions created through the API run in the sandbox: no hypervisor can run a guest here ({why})");
            Isolation::Sandbox
        }
        (None, None) => Isolation::MicroVm,
    };
    for FunctionConfig {
        mut function,
        hypervisor,
        ..
    } in configs
    {
        let defaulted = hypervisor.is_none() && hypervisor_override.is_none();
        if function.isolation == Isolation::MicroVm && defaulted {
            if let Some(why) = &no_microvm {
                eprintln!(
                    "kindling: {} runs in the sandbox: no hypervisor can run a guest here ({why})",
                    function.name
                );
                if function.snapstart {
                    eprintln!(
                        "kindling: {}: snapstart is off: the sandbox has no VM to snapshot",
                        function.name
                    );
                    function.snapstart = false;
                }
                function.isolation = Isolation::Sandbox;
            }
        }
        ready_code(&mut function)?;
        match function.isolation {
            Isolation::Sandbox => sandboxes.add(&function.runtime)?,
            Isolation::MicroVm => {
                let backend = backend(hypervisor_override.or(hypervisor))?;
                if let (true, Err(why)) = (function.snapstart, backend.snapshots()) {
                    eprintln!(
                        "kindling: {}: snapstart has no effect on {}: {why}; its cold starts boot",
                        function.name,
                        backend.name()
                    );
                }
                microvm.assign(&function.name, backend);
            }
        }
        functions.push(function);
    }
    if default_isolation == Isolation::MicroVm {
        microvm.assign_default(backend(hypervisor_override)?);
    }
    if default_isolation == Isolation::Sandbox || !sandboxes.is_empty() {
        launchers.insert(Isolation::Sandbox, sandboxes.clone());
    }
    if default_isolation == Isolation::MicroVm
        || functions.iter().any(|f| f.isolation == Isolation::MicroVm)
    {
        launchers.insert(Isolation::MicroVm, Arc::new(microvm));
    }
    Ok(Prepared {
        functions,
        launchers,
        deployer: Arc::new(CodeDeployer { sandboxes }),
        default_isolation,
    })
}

/// Readies uploaded code as functions.toml's: checked and unpacked into the image cache,
/// and the sandbox launcher readied for its runtime.
#[derive(Debug)]
struct CodeDeployer {
    sandboxes: Arc<SandboxByRuntime>,
}

impl Deployer for CodeDeployer {
    fn prepare(&self, mut function: Function) -> Result<Function, DeployError> {
        ready_code(&mut function).map_err(deploy_error)?;
        if function.isolation == Isolation::Sandbox {
            self.sandboxes.add(&function.runtime)?;
        }
        Ok(function)
    }

    /// Unpacks the layer into the image cache, as a function using it would.
    fn check_layer(&self, zip: &Path) -> Result<(), DeployError> {
        build_layers_image(&open_cache()?, &[zip.to_path_buf()])
            .map(drop)
            .map_err(deploy_error)
    }
}

/// A refusal of the caller's code (a [`CodeError`] in the chain), else the host's failure.
fn deploy_error(e: anyhow::Error) -> DeployError {
    match e.chain().find_map(|c| c.downcast_ref::<CodeError>()) {
        Some(refusal) => DeployError::Refused(refusal.to_string()),
        None => DeployError::Failed(e),
    }
}

/// Points the function's code and layers at the folders the image cache keeps of them:
/// zips unpacked, either form checked (no escaping paths or links, the handler present,
/// Lambda's size limits), and the layers merged in order into one folder, `/opt`.
fn ready_code(function: &mut Function) -> anyhow::Result<()> {
    let runtime = function.runtime.parse::<Runtime>()?;
    let cache = open_cache()?;
    let image = build_code_image(&cache, &function.code, runtime, &function.handler)
        .with_context(|| format!("function {}: {}", function.name, function.code.display()))?;
    function.code = image.dir;
    if !function.layers.is_empty() {
        let opt = build_layers_image(&cache, &function.layers)
            .with_context(|| format!("function {}", function.name))?;
        function.layers = vec![opt.dir];
    }
    Ok(())
}

/// Why no hypervisor backend can boot a guest on this host, if none can.
fn why_no_microvm() -> Option<String> {
    let kvm = probe::kvm();
    if kvm.can_boot_linux {
        return None;
    }
    let missing: Vec<&str> = [qemu::QEMU, qemu::VHOST_VSOCK]
        .into_iter()
        .filter(|program| !in_path(program))
        .collect();
    (!missing.is_empty())
        .then(|| format!("{}; {} not installed", kvm.reason, missing.join(" and ")))
}

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// The hypervisor asked for, or the best this host can run. Asking for one that cannot
/// run here is an error, never a silent switch.
fn backend(asked: Option<Hypervisor>) -> anyhow::Result<Arc<dyn Backend>> {
    let kvm = probe::kvm();
    Ok(match asked {
        Some(Hypervisor::Kindling) if !kvm.can_boot_linux => {
            bail!(
                "hypervisor \"kindling\" cannot run here: {}; use hypervisor = \"qemu\"",
                kvm.reason
            )
        }
        Some(Hypervisor::Kindling) => kindling_vmm()?,
        None if kvm.can_boot_linux => kindling_vmm()?,
        Some(Hypervisor::Qemu) | None => {
            let accel = if kvm.can_boot_linux {
                Accel::Kvm
            } else {
                Accel::Tcg
            };
            if asked.is_none() {
                tracing::info!("microVMs run on QEMU ({accel:?}): {}", kvm.reason);
            }
            Arc::new(Qemu::new(accel, static_program("kindling-jailer")?)?)
        }
    })
}

/// kindling-vmm, always behind kindling-jailer.
fn kindling_vmm() -> anyhow::Result<Arc<dyn Backend>> {
    Ok(Arc::new(KindlingVmm {
        program: static_program("kindling-vmm")?,
        jailer: static_program("kindling-jailer")?,
    }))
}

/// One of the static builds of scripts/build-guest.sh (kindling-vmm, kindling-jailer),
/// which sit beside the static guest binaries (the VMM's chroot holds no libraries).
fn static_program(name: &str) -> anyhow::Result<PathBuf> {
    let dir = kindling_images::locate::guest_bin_dir().map_err(anyhow::Error::msg)?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build the static binaries (scripts/build-guest.sh)",
            path.display()
        );
    }
    Ok(path)
}

/// Sandboxes whose root is their runtime's image directory (the same tree a microVM of
/// that runtime boots), one launcher per runtime, added as functions need them.
#[derive(Debug)]
struct SandboxByRuntime {
    images: Arc<ImageCache>,
    roots: Mutex<HashMap<String, Arc<SandboxLauncher>>>,
    network: Option<Arc<Network>>,
}

impl SandboxByRuntime {
    fn roots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<SandboxLauncher>>> {
        self.roots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_empty(&self) -> bool {
        self.roots().is_empty()
    }

    fn add(&self, runtime: &str) -> anyhow::Result<()> {
        if !self.roots().contains_key(runtime) {
            let root = self.images.root(runtime.parse::<Runtime>()?)?.dir;
            if !root.is_dir() {
                bail!(
                    "the root folder {} of runtime {runtime} is missing",
                    root.display()
                );
            }
            let options = SandboxOptions {
                root: Some(root),
                network: self.network.clone(),
                ..SandboxOptions::default()
            };
            self.roots()
                .insert(runtime.to_string(), Arc::new(SandboxLauncher::new(options)));
        }
        Ok(())
    }
}

#[async_trait]
impl Launcher for SandboxByRuntime {
    fn name(&self) -> &str {
        "sandbox"
    }

    async fn start(&self, spec: &EnvironmentSpec) -> anyhow::Result<Box<dyn Environment>> {
        let runtime = &spec.function.runtime;
        let launcher = self
            .roots()
            .get(runtime)
            .cloned()
            .with_context(|| format!("no sandbox root for runtime {runtime:?}"))?;
        launcher.start(spec).await
    }

    fn remove_orphan(&self, id: &str) {
        // The launchers differ only in their root: any one removes the cgroup.
        let any = self.roots().values().next().cloned();
        if let Some(launcher) = any {
            launcher.remove_orphan(id);
        }
    }
}

/// Boot files, code and layer images from the content-addressed image cache (or the
/// manifest given instead), looked up once per runtime and code: a cold start must not
/// re-hash the kernel sources.
#[derive(Default, Debug)]
struct ImageCache {
    manifest: Option<ImagesManifest>,
    boot: Mutex<HashMap<String, BootFiles>>,
    /// By the function's (unpacked) code folder: an update brings a new one.
    code: Mutex<HashMap<PathBuf, PathBuf>>,
    /// By the function's (merged) layers folder.
    layers: Mutex<HashMap<PathBuf, PathBuf>>,
}

impl ImageCache {
    /// `runtime`'s root image.
    fn root(&self, runtime: Runtime) -> anyhow::Result<RootPaths> {
        match &self.manifest {
            Some(manifest) => Ok(manifest.root(runtime)?.clone()),
            None => {
                let image = build_root_image(&open_cache()?, runtime)?;
                Ok(RootPaths {
                    ext4: image.ext4,
                    dir: image.dir,
                })
            }
        }
    }
}

impl ImageSource for ImageCache {
    fn boot_files(&self, runtime: &str) -> anyhow::Result<BootFiles> {
        if let Some(files) = self.boot.lock().expect("not poisoned").get(runtime) {
            return Ok(files.clone());
        }
        let root = self.root(runtime.parse::<Runtime>()?)?;
        let (kernel, initramfs) = match &self.manifest {
            Some(manifest) => (manifest.kernel.clone(), manifest.initramfs.clone()),
            None => {
                let cache = open_cache()?;
                let kernel = build_kernel(&cache, KernelKind::Minimal)?;
                let initramfs = build_initramfs(&cache, &kernel)?;
                (kernel.bzimage, initramfs.path)
            }
        };
        let files = BootFiles {
            kernel,
            initramfs,
            root_image: root.ext4,
        };
        self.boot
            .lock()
            .expect("not poisoned")
            .insert(runtime.to_string(), files.clone());
        Ok(files)
    }

    fn code_image(&self, function: &Function) -> anyhow::Result<PathBuf> {
        if let Some(path) = self.code.lock().expect("not poisoned").get(&function.code) {
            return Ok(path.clone());
        }
        let cache = open_cache()?;
        let runtime = function.runtime.parse::<Runtime>()?;
        let image = build_code_image(&cache, &function.code, runtime, &function.handler)?;
        self.code
            .lock()
            .expect("not poisoned")
            .insert(function.code.clone(), image.ext4.clone());
        Ok(image.ext4)
    }

    fn layers_image(&self, function: &Function) -> anyhow::Result<Option<PathBuf>> {
        // Readied functions have one folder of layers, merged.
        let Some(opt) = function.layers.first() else {
            return Ok(None);
        };
        if let Some(path) = self.layers.lock().expect("not poisoned").get(opt) {
            return Ok(Some(path.clone()));
        }
        let image = build_layers_image(&open_cache()?, &function.layers)?;
        self.layers
            .lock()
            .expect("not poisoned")
            .insert(opt.clone(), image.ext4.clone());
        Ok(Some(image.ext4))
    }
}
