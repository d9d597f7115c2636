//! `kindling images ...`: build, list and prune what guests boot. The building is
//! kindling-images' work; this is its command line, its spinners and its tables.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use kindling_images::{
    build_initramfs, build_kernel, build_nested_host, build_root_image, prune, Cache, EntryInfo,
    ImagesManifest, KernelKind, Progress, RootPaths, Runtime, StepProgress,
};

/// The `images` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// Build (or find cached) the kernel, its initramfs and root images.
    Build {
        /// Root images to build (repeatable); all of them when none is given.
        #[arg(long = "runtime", value_parser = runtime_parser())]
        runtimes: Vec<Runtime>,
        /// Which guest kernel to build.
        #[arg(long, value_parser = kernel_parser(), default_value = KernelKind::Minimal.name())]
        kernel: KernelKind,
        /// Also the nested-KVM test harness's level-1 host (Debian's generic kernel with
        /// its KVM modules, and busybox), for hosts whose KVM cannot boot Linux.
        #[arg(long)]
        nested_host: bool,
        /// Write the paths of what was built to this JSON file, for `kindling serve
        /// --images` on a host without Debian's build tools.
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
    },
    /// Show what is cached: kind, name (with its content hash), size and path.
    List,
    /// Remove unfinished builds, function code images and entries that current inputs no
    /// longer produce.
    Prune {
        /// Remove everything, including downloaded Debian packages.
        #[arg(long)]
        all: bool,
    },
}

impl ImagesCommand {
    pub fn run(self) -> Result<()> {
        let cache = open_cache()?;
        match self {
            ImagesCommand::Build {
                runtimes,
                kernel,
                nested_host,
                manifest,
            } => build(&cache, runtimes, kernel, nested_host, manifest.as_deref()),
            ImagesCommand::List => list(&cache),
            ImagesCommand::Prune { all } => print_pruned(&cache, all),
        }
    }
}

/// `--runtime`'s values: the runtimes' names, each with its summary in `--help`.
pub fn runtime_parser() -> impl TypedValueParser<Value = Runtime> {
    let values = Runtime::ALL.map(|r| PossibleValue::new(r.name()).help(r.summary()));
    PossibleValuesParser::new(values).try_map(|name| name.parse::<Runtime>())
}

/// `--kernel`'s values, like [`runtime_parser`]'s.
fn kernel_parser() -> impl TypedValueParser<Value = KernelKind> {
    let values = KernelKind::ALL.map(|k| PossibleValue::new(k.name()).help(k.summary()));
    PossibleValuesParser::new(values).try_map(|name| name.parse::<KernelKind>())
}

/// The user's image cache, with long build steps drawn as spinners on stderr.
pub fn open_cache() -> Result<Cache> {
    Ok(Cache::open()?.with_progress(Arc::new(Spinners)))
}

/// Draws each long build step as a spinner that says what runs and shows the latest line
/// of its output (hidden when stderr is not a terminal, as in CI, where `tracing` carries
/// the same news).
#[derive(Debug)]
struct Spinners;

impl Progress for Spinners {
    fn start(&self, what: &str) -> Box<dyn StepProgress> {
        let bar = ProgressBar::new_spinner();
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix}: {wide_msg}")
        {
            bar.set_style(style);
        }
        bar.set_prefix(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        Box::new(Spinner(bar))
    }
}

/// One step's spinner, gone from the terminal once the step ends.
struct Spinner(ProgressBar);

impl StepProgress for Spinner {
    fn message(&self, text: &str) {
        self.0.set_message(text.to_string());
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

fn build(
    cache: &Cache,
    mut runtimes: Vec<Runtime>,
    kind: KernelKind,
    nested_host: bool,
    manifest: Option<&Path>,
) -> Result<()> {
    let started = Instant::now();
    if runtimes.is_empty() {
        runtimes = Runtime::ALL.to_vec();
    }
    let kernel = build_kernel(cache, kind)?;
    report(
        &format!("kernel {}", kind.name()),
        kernel.cached,
        kernel.elapsed,
        &kernel.bzimage.display(),
    );
    if let Some(vmlinux) = &kernel.vmlinux {
        println!("{:>28}  {}", "", vmlinux.display());
    }
    let initramfs = build_initramfs(cache, &kernel)?;
    report(
        "initramfs",
        initramfs.cached,
        initramfs.elapsed,
        &initramfs.path.display(),
    );
    let mut built = ImagesManifest {
        kernel: kernel.bzimage.clone(),
        initramfs: initramfs.path.clone(),
        runtimes: Default::default(),
    };
    for runtime in runtimes {
        let image = build_root_image(cache, runtime)?;
        report(
            &format!("rootfs {}", runtime.name()),
            image.cached,
            image.elapsed,
            &image.ext4.display(),
        );
        built.runtimes.insert(
            runtime.name().to_string(),
            RootPaths {
                ext4: image.ext4,
                dir: image.dir,
            },
        );
    }
    if let Some(path) = manifest {
        built.save(path)?;
    }
    if nested_host {
        let host = build_nested_host(cache)?;
        report(
            "nested host",
            host.cached,
            host.elapsed,
            &host.kernel.display(),
        );
    }
    println!(
        "done in {:.1?}; cache: {}",
        started.elapsed(),
        cache.root().display()
    );
    Ok(())
}

fn report(what: &str, cached: bool, elapsed: Duration, path: &dyn std::fmt::Display) {
    println!("{}", row(what, cached, elapsed, path));
}

/// One line of `images build`'s table. Scripts read it with awk (scripts/test.sh: the
/// first words name the artifact, the last field is its path): keep the format.
fn row(what: &str, cached: bool, elapsed: Duration, path: &dyn std::fmt::Display) -> String {
    let how = if cached { "cached" } else { "built" };
    format!(
        "{what:<24} {how:<6} {:>8.2}s  {path}",
        elapsed.as_secs_f64()
    )
}

fn list(cache: &Cache) -> Result<()> {
    let entries = cache.list()?;
    if entries.is_empty() {
        println!("nothing cached in {}", cache.root().display());
    }
    for EntryInfo {
        kind,
        name,
        path,
        bytes,
    } in entries
    {
        println!(
            "{kind:<10} {name:<36} {:>9.1} MiB  {}",
            bytes as f64 / f64::from(1 << 20),
            path.display()
        );
    }
    Ok(())
}

fn print_pruned(cache: &Cache, all: bool) -> Result<()> {
    let removed = prune(cache, all)?;
    for path in &removed {
        println!("removed {}", path.display());
    }
    println!("{} entries removed", removed.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::error::ErrorKind;
    use clap::Parser;

    fn images(args: &[&str]) -> ImagesCommand {
        let argv = ["kindling", "images"].iter().chain(args);
        match Cli::try_parse_from(argv) {
            Ok(Cli {
                command: Command::Images(cmd),
            }) => cmd,
            Ok(_) => panic!("{args:?} parsed as another command"),
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    fn refused(args: &[&str]) -> clap::Error {
        match Cli::try_parse_from(["kindling", "images"].iter().chain(args)) {
            Ok(_) => panic!("{args:?} was accepted"),
            Err(e) => e,
        }
    }

    #[test]
    fn build_defaults_to_every_runtime_on_the_minimal_kernel() {
        let ImagesCommand::Build {
            runtimes,
            kernel,
            nested_host,
            manifest,
        } = images(&["build"])
        else {
            panic!("not build");
        };
        assert!(runtimes.is_empty());
        assert_eq!(kernel, KernelKind::Minimal);
        assert!(!nested_host);
        assert_eq!(manifest, None);
    }

    #[test]
    fn build_takes_a_manifest_the_nested_host_and_runtimes() {
        let ImagesCommand::Build {
            runtimes,
            kernel,
            nested_host,
            manifest,
        } = images(&[
            "build",
            "--manifest",
            "out/images.json",
            "--nested-host",
            "--runtime",
            "provided-debian",
            "--runtime",
            "node",
            "--kernel",
            "stock",
        ])
        else {
            panic!("not build");
        };
        assert_eq!(runtimes, [Runtime::ProvidedDebian, Runtime::Node]);
        assert_eq!(kernel, KernelKind::Stock);
        assert!(nested_host);
        assert_eq!(manifest, Some(PathBuf::from("out/images.json")));
    }

    #[test]
    fn an_unknown_runtime_or_kernel_is_refused_with_the_known_ones() {
        let err = refused(&["build", "--runtime", "ruby"]);
        assert_eq!(err.kind(), ErrorKind::InvalidValue);
        let text = err.to_string();
        assert!(
            text.contains("invalid value 'ruby' for '--runtime <RUNTIMES>'"),
            "{text}"
        );
        assert!(
            text.contains("[possible values: provided, provided-debian, python, node]"),
            "{text}"
        );
        let err = refused(&["build", "--kernel", "Minimal"]).to_string();
        assert!(err.contains("[possible values: minimal, stock]"), "{err}");
    }

    #[test]
    fn the_long_help_describes_each_runtime_and_kernel() {
        let help = refused(&["build", "--help"]);
        assert_eq!(help.kind(), ErrorKind::DisplayHelp);
        let help = help.to_string();
        for runtime in Runtime::ALL {
            assert!(help.contains(runtime.summary()), "{help}");
        }
        assert!(help.contains(KernelKind::Stock.summary()), "{help}");
        assert!(help.contains("[default: minimal]"), "{help}");
    }

    #[test]
    fn list_and_prune_parse() {
        assert!(matches!(images(&["list"]), ImagesCommand::List));
        assert!(matches!(
            images(&["prune"]),
            ImagesCommand::Prune { all: false }
        ));
        assert!(matches!(
            images(&["prune", "--all"]),
            ImagesCommand::Prune { all: true }
        ));
        assert_eq!(
            refused(&["list", "--all"]).kind(),
            ErrorKind::UnknownArgument
        );
    }

    #[test]
    fn a_build_row_keeps_the_columns_scripts_read() {
        let path = Path::new("/c/kernel/minimal-0123/bzImage");
        let line = row(
            "kernel minimal",
            true,
            Duration::from_millis(1234),
            &path.display(),
        );
        assert_eq!(
            line,
            "kernel minimal           cached     1.23s  /c/kernel/minimal-0123/bzImage"
        );
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[..2], ["kernel", "minimal"]);
        assert_eq!(fields.last(), Some(&"/c/kernel/minimal-0123/bzImage"));
        let built = row(
            "rootfs provided-debian",
            false,
            Duration::from_secs(75),
            &"/x",
        );
        assert_eq!(built, "rootfs provided-debian   built     75.00s  /x");
    }
}
