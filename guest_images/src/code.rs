//! Function code: a folder or a Lambda-style `.zip` becomes `/var/task`, as an unpacked
//! folder (the sandbox binds it read-only) and as a small ext4 image (the microVM's second,
//! read-only drive).
//!
//! Everything is checked before anything is written: a rejected package leaves no trace,
//! not even in the cache. The checks run on a [`Manifest`] read from the zip's directory
//! (or by walking the folder), so zip and folder follow the same rules.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use walkdir::WalkDir;

use crate::cache::{Built, Cache};
use crate::ext4::make_ext4;
use crate::fsutil::{copy_tree, overlay_tree};
use crate::rootfs::Runtime;

/// Lambda's limit on unzipped code: 250 MB (a function's layers together have as much).
pub const MAX_UNZIPPED_BYTES: u64 = 250 * 1024 * 1024;
/// Lambda's limit on a function's layers.
pub const MAX_LAYERS: usize = 5;
/// Symlink hops followed when checking where a link leads (Linux's own limit).
const MAX_LINK_HOPS: usize = 40;
const TASK_DIR: &str = "task";
const TASK_EXT4: &str = "task.ext4";

/// Why a code package was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodeError {
    #[error("{0} is neither a folder nor a .zip file")]
    NotCode(PathBuf),
    #[error("{0} is not a valid zip file: {1}")]
    BadZip(PathBuf, String),
    #[error("zip entry {0:?} has an absolute path")]
    AbsolutePath(String),
    #[error("zip entry {0:?} climbs out of the code folder with '..'")]
    ParentDir(String),
    #[error("symlink {path:?} -> {target:?} points outside the code folder")]
    EscapingSymlink { path: String, target: String },
    #[error("the code unpacks to {bytes} bytes, more than Lambda's limit of 250 MB ({MAX_UNZIPPED_BYTES} bytes)")]
    TooLarge { bytes: u64 },
    #[error("{0:?} is not a regular file, folder or symlink")]
    SpecialFile(String),
    #[error("{0:?} is both a file (or symlink) and a folder in the package")]
    Conflict(String),
    #[error("handler {handler:?} is not of the form {form}")]
    BadHandler { handler: String, form: &'static str },
    #[error("handler {handler:?} needs {expected} in the code, and it is not there")]
    MissingHandler { handler: String, expected: String },
    #[error("{0} layers; a function has at most {MAX_LAYERS}, as in Lambda")]
    TooManyLayers(usize),
    #[error("layer {layer}: {error}")]
    Layer {
        layer: PathBuf,
        error: Box<CodeError>,
    },
}

/// A function's code in the cache.
#[derive(Debug, Clone)]
pub struct CodeImage {
    /// The unpacked code (the sandbox's `/var/task`).
    pub dir: PathBuf,
    /// The same tree as an ext4 filesystem (the microVM's `/dev/vdb`, mounted at `/var/task`).
    pub ext4: PathBuf,
    pub cached: bool,
    pub elapsed: Duration,
}

impl CodeImage {
    /// The image a cache entry holds: its tree and that tree's ext4.
    fn of(built: Built) -> CodeImage {
        CodeImage {
            dir: built.path.join(TASK_DIR),
            ext4: built.path.join(TASK_EXT4),
            cached: built.cached,
            elapsed: built.elapsed,
        }
    }
}

/// Checks `source` (a folder or a `.zip`) for `runtime`'s `handler` and turns it into a
/// cached code image. Rejections are [`CodeError`]s (reach them with `downcast_ref`).
pub fn build_code_image(
    cache: &Cache,
    source: &Path,
    runtime: Runtime,
    handler: &str,
) -> Result<CodeImage> {
    let source_kind = Source::of(source)?;
    let manifest = match source_kind {
        Source::Dir => Manifest::of_dir(source)?,
        Source::Zip => Manifest::of_zip(source)?,
    };
    manifest.check()?;
    check_handler(&manifest, runtime, handler)?;
    let mut fp = cache.fingerprint("code");
    match source_kind {
        Source::Dir => fp.tree("dir", source)?,
        Source::Zip => fp.file("zip", source)?,
    };
    let key = fp.key();
    let built = cache.get_or_build("code", &key, |out| {
        let log = cache.fresh_log(&format!("code-{key}"))?;
        let step = cache.step(format!("function code {}", source.display()));
        let task = out.join(TASK_DIR);
        source_kind.unpack(source, &manifest, &task)?;
        fs::set_permissions(&task, fs::Permissions::from_mode(0o755))?;
        make_ext4(
            &task,
            &out.join(TASK_EXT4),
            "kindling-task",
            &key,
            &step,
            &log,
        )?;
        step.done("built");
        Ok(())
    })?;
    Ok(CodeImage::of(built))
}

/// Checks each of `layers` (folders or `.zip`s) as code is checked and unpacks them, in
/// order, into one folder: Lambda's `/opt`, where a later layer's files replace an earlier
/// one's. Cached with its ext4 image as code is ([`CodeImage`]: `dir` for the sandbox,
/// `ext4` for the microVM's third drive). Refusals are [`CodeError`]s naming the layer.
pub fn build_layers_image(cache: &Cache, layers: &[PathBuf]) -> Result<CodeImage> {
    if layers.len() > MAX_LAYERS {
        return Err(CodeError::TooManyLayers(layers.len()).into());
    }
    let in_layer = |layer: &Path| {
        let layer = layer.to_path_buf();
        move |error| CodeError::Layer {
            layer,
            error: Box::new(error),
        }
    };
    let mut fp = cache.fingerprint("layers");
    let mut checked = Vec::new();
    let mut bytes = 0;
    for layer in layers {
        let kind = Source::of(layer).map_err(|e| refusal(e, layer))?;
        let manifest = match kind {
            Source::Dir => Manifest::of_dir(layer),
            Source::Zip => Manifest::of_zip(layer),
        }
        .map_err(|e| refusal(e, layer))?;
        manifest.check().map_err(in_layer(layer))?;
        bytes += manifest.bytes();
        match kind {
            Source::Dir => fp.tree("dir", layer)?,
            Source::Zip => fp.file("zip", layer)?,
        };
        checked.push((layer, kind, manifest));
    }
    if bytes > MAX_UNZIPPED_BYTES {
        return Err(CodeError::TooLarge { bytes }.into());
    }
    let key = fp.key();
    let built = cache.get_or_build("code", &format!("opt-{key}"), |out| {
        let log = cache.fresh_log(&format!("opt-{key}"))?;
        let step = cache.step(format!("{} layers", layers.len()));
        let opt = out.join(TASK_DIR);
        fs::create_dir_all(&opt)?;
        for (n, (layer, kind, manifest)) in checked.iter().enumerate() {
            let unpacked = out.join(format!("layer-{n}"));
            kind.unpack(layer, manifest, &unpacked)?;
            overlay_tree(&unpacked, &opt)?;
            fs::remove_dir_all(&unpacked)?;
        }
        fs::set_permissions(&opt, fs::Permissions::from_mode(0o755))?;
        // Layers checked one by one may still combine into what one alone may not hold
        // (a link of one leading out through a link of another): check them as one.
        Manifest::of_dir(&opt)?
            .check()
            .map_err(in_layer(layers.last().expect("built from some layer")))?;
        make_ext4(
            &opt,
            &out.join(TASK_EXT4),
            "kindling-opt",
            &key,
            &step,
            &log,
        )?;
        step.done("built");
        Ok(())
    })?;
    Ok(CodeImage::of(built))
}

/// A layer's own refusal ([`CodeError`]) named after it; any other error as it is.
fn refusal(error: anyhow::Error, layer: &Path) -> anyhow::Error {
    match error.downcast::<CodeError>() {
        Ok(refused) => CodeError::Layer {
            layer: layer.to_path_buf(),
            error: Box::new(refused),
        }
        .into(),
        Err(other) => other.context(format!("layer {}", layer.display())),
    }
}

#[derive(Clone, Copy)]
enum Source {
    Dir,
    Zip,
}

impl Source {
    fn of(path: &Path) -> Result<Source> {
        let meta = fs::metadata(path)
            .with_context(|| format!("cannot read the function code at {}", path.display()))?;
        if meta.is_dir() {
            Ok(Source::Dir)
        } else if meta.is_file()
            && path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("zip"))
        {
            Ok(Source::Zip)
        } else {
            Err(CodeError::NotCode(path.to_path_buf()).into())
        }
    }

    /// Copies or unzips `source`, whose checked `manifest` this is, into the folder `dest`.
    fn unpack(self, source: &Path, manifest: &Manifest, dest: &Path) -> Result<()> {
        match self {
            Source::Dir => copy_tree(source, dest),
            Source::Zip => unzip(source, manifest, dest),
        }
    }
}

/// One path of a code package.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir { mode: u32 },
    File { size: u64, mode: u32 },
    Symlink(String),
}

/// Every path of a package (relative, `/`-separated, no `.` or `..`), before unpacking.
#[derive(Debug, Default)]
struct Manifest {
    nodes: BTreeMap<String, Node>,
}

impl Manifest {
    fn of_dir(root: &Path) -> Result<Manifest> {
        let mut manifest = Manifest::default();
        for entry in WalkDir::new(root).min_depth(1) {
            let entry = entry.with_context(|| format!("cannot read {}", root.display()))?;
            let rel = entry
                .path()
                .strip_prefix(root)
                .expect("walk stays below its root");
            let rel = rel.to_string_lossy().into_owned();
            let meta = entry.path().symlink_metadata()?;
            let mode = meta.permissions().mode() & 0o777;
            let node = if meta.is_dir() {
                Node::Dir { mode }
            } else if meta.is_file() {
                Node::File {
                    size: meta.len(),
                    mode,
                }
            } else if meta.file_type().is_symlink() {
                Node::Symlink(fs::read_link(entry.path())?.to_string_lossy().into_owned())
            } else {
                return Err(CodeError::SpecialFile(rel).into());
            };
            manifest.nodes.insert(rel, node);
        }
        Ok(manifest)
    }

    fn of_zip(path: &Path) -> Result<Manifest> {
        let mut zip = open_zip(path)?;
        let mut manifest = Manifest::default();
        for i in 0..zip.len() {
            let mut entry = zip.by_index(i)?;
            let Some(rel) = clean_zip_path(&entry.name()?)? else {
                continue;
            };
            let mode = entry.unix_mode();
            let node = match mode.map(|m| m & 0o170000) {
                Some(0o120000) => {
                    let mut target = String::new();
                    (&mut entry).take(4096).read_to_string(&mut target)?;
                    Node::Symlink(target)
                }
                kind if entry.is_dir() || kind == Some(0o040000) => Node::Dir {
                    mode: mode.map_or(0o755, |m| m & 0o777),
                },
                None | Some(0o100000) | Some(0) => Node::File {
                    size: entry.size(),
                    mode: mode.map_or(0o644, |m| m & 0o777),
                },
                Some(_) => return Err(CodeError::SpecialFile(rel).into()),
            };
            manifest.nodes.insert(rel, node);
        }
        Ok(manifest)
    }

    /// What its files hold, as their sizes say.
    fn bytes(&self) -> u64 {
        self.nodes
            .values()
            .map(|n| match n {
                Node::File { size, .. } => *size,
                _ => 0,
            })
            .sum()
    }

    /// The size limit, paths through files or symlinks, and symlinks that lead outside.
    fn check(&self) -> Result<(), CodeError> {
        let bytes = self.bytes();
        if bytes > MAX_UNZIPPED_BYTES {
            return Err(CodeError::TooLarge { bytes });
        }
        for path in self.nodes.keys() {
            for (at, _) in path.match_indices('/') {
                let folder = &path[..at];
                if matches!(
                    self.nodes.get(folder),
                    Some(Node::File { .. } | Node::Symlink(_))
                ) {
                    return Err(CodeError::Conflict(folder.to_string()));
                }
            }
        }
        for (path, node) in &self.nodes {
            if let Node::Symlink(target) = node {
                let parent = path
                    .rsplit_once('/')
                    .map_or(vec![], |(p, _)| p.split('/').collect());
                if self.resolve(parent, target, 0).is_none() {
                    return Err(CodeError::EscapingSymlink {
                        path: path.clone(),
                        target: target.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Where `target`, read from the folder `base`, leads inside the package, following
    /// the package's own symlinks; `None` when it leaves the package (or loops).
    fn resolve<'a>(
        &'a self,
        mut at: Vec<&'a str>,
        target: &'a str,
        hops: usize,
    ) -> Option<Vec<&'a str>> {
        if target.starts_with('/') || hops > MAX_LINK_HOPS {
            return None;
        }
        for part in target.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    at.pop()?;
                }
                name => {
                    at.push(name);
                    if let Some(Node::Symlink(next)) = self.nodes.get(&at.join("/")) {
                        at.pop();
                        at = self.resolve(at, next, hops + 1)?;
                    }
                }
            }
        }
        Some(at)
    }

    fn has(&self, path: &str) -> bool {
        self.nodes.contains_key(path)
    }
}

/// A zip entry name as a clean relative path (`None` for the root itself), or why not.
fn clean_zip_path(name: &str) -> Result<Option<String>, CodeError> {
    let unified = name.replace('\\', "/");
    let drive = unified.as_bytes().get(1) == Some(&b':');
    if unified.starts_with('/') || drive {
        return Err(CodeError::AbsolutePath(name.to_string()));
    }
    let mut parts = Vec::new();
    for part in unified.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(CodeError::ParentDir(name.to_string())),
            part => parts.push(part),
        }
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

/// Checks that the file `handler` names exists, by the runtime's convention. Code that
/// brings an executable `bootstrap` runs it instead of the image's runtime (the agent
/// looks in /var/task first), so its handler is that bootstrap's business alone.
fn check_handler(manifest: &Manifest, runtime: Runtime, handler: &str) -> Result<(), CodeError> {
    let executable = |path: &str| match manifest.nodes.get(path) {
        Some(Node::File { mode, .. }) => mode & 0o111 != 0,
        _ => true,
    };
    if !runtime.custom() && manifest.has("bootstrap") && executable("bootstrap") {
        return Ok(());
    }
    let bad = |form| CodeError::BadHandler {
        handler: handler.to_string(),
        form,
    };
    let candidates: Vec<String> = match runtime {
        // awslambdaric's module is everything before the last dot; Kindling's runtime
        // also takes a shorter module whose attributes lead to the function
        // (`app.nested.deep`), so any prefix of the module path will do.
        Runtime::Python => {
            let (module, _) = handler
                .rsplit_once('.')
                .filter(|(m, f)| !m.is_empty() && !f.is_empty())
                .ok_or(bad("module.function"))?;
            let parts: Vec<&str> = module.split(['.', '/']).collect();
            (1..=parts.len())
                .rev()
                .flat_map(|n| {
                    let path = parts[..n].join("/");
                    [format!("{path}.py"), format!("{path}/__init__.py")]
                })
                .collect()
        }
        // As Lambda's Node.js runtime splits it: `dir/file.export.deeper`.
        Runtime::Node => {
            let (dir, base) = handler.rsplit_once('/').unwrap_or(("", handler));
            let (file, _) = base
                .split_once('.')
                .filter(|(m, f)| !m.is_empty() && !f.is_empty())
                .ok_or(bad("file.function"))?;
            let path = if dir.is_empty() {
                file.to_string()
            } else {
                format!("{dir}/{file}")
            };
            ["js", "mjs", "cjs"]
                .iter()
                .map(|ext| format!("{path}.{ext}"))
                .collect()
        }
        Runtime::Provided | Runtime::ProvidedDebian => vec!["bootstrap".to_string()],
    };
    match candidates.iter().find(|c| manifest.has(c)) {
        Some(path) if runtime.custom() && !executable(path) => Err(CodeError::MissingHandler {
            handler: handler.to_string(),
            expected: "an executable bootstrap (it is there but not executable)".to_string(),
        }),
        Some(_) => Ok(()),
        None => Err(CodeError::MissingHandler {
            handler: handler.to_string(),
            expected: candidates.join(" or "),
        }),
    }
}

fn open_zip(path: &Path) -> Result<zip::ZipArchive<File>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    zip::ZipArchive::new(file)
        .map_err(|e| CodeError::BadZip(path.to_path_buf(), e.to_string()).into())
}

/// Unpacks a checked zip into `task`: folders and files first, folder modes and symlinks
/// last, so nothing is ever written through a symlink or into a read-only folder. The
/// size limit is enforced on the bytes actually inflated, not on what the zip claims.
fn unzip(path: &Path, manifest: &Manifest, task: &Path) -> Result<()> {
    let mut zip = open_zip(path)?;
    fs::create_dir_all(task)?;
    let mut budget = MAX_UNZIPPED_BYTES;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i)?;
        let Some(rel) = clean_zip_path(&entry.name()?)? else {
            continue;
        };
        let dest = task.join(&rel);
        match &manifest.nodes[&rel] {
            Node::Dir { .. } => fs::create_dir_all(&dest)?,
            Node::File { mode, .. } => {
                fs::create_dir_all(dest.parent().expect("entries are below task"))?;
                let mut out = File::create(&dest)?;
                let written = io::copy(&mut (&mut entry).take(budget + 1), &mut out)?;
                if written > budget {
                    return Err(CodeError::TooLarge {
                        bytes: MAX_UNZIPPED_BYTES - budget + written,
                    }
                    .into());
                }
                budget -= written;
                fs::set_permissions(&dest, fs::Permissions::from_mode(*mode))?;
            }
            Node::Symlink(_) => {}
        }
    }
    // Folders the zip only implies get the usual mode, whatever the builder's umask.
    for entry in WalkDir::new(task).min_depth(1) {
        let entry = entry?;
        let rel = entry
            .path()
            .strip_prefix(task)
            .expect("walk stays below its root");
        if entry.file_type().is_dir() && !manifest.has(&rel.to_string_lossy()) {
            fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o755))?;
        }
    }
    for (rel, node) in manifest.nodes.iter().rev() {
        let dest = task.join(rel);
        match node {
            Node::Dir { mode } => fs::set_permissions(&dest, fs::Permissions::from_mode(*mode))?,
            Node::Symlink(target) => {
                fs::create_dir_all(dest.parent().expect("entries are below task"))?;
                symlink(target, &dest)?;
            }
            Node::File { .. } => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(nodes: &[(&str, Node)]) -> Manifest {
        Manifest {
            nodes: nodes
                .iter()
                .map(|(p, n)| (p.to_string(), n.clone()))
                .collect(),
        }
    }
    fn link(t: &str) -> Node {
        Node::Symlink(t.to_string())
    }
    const DIR: Node = Node::Dir { mode: 0o755 };

    #[test]
    fn zip_paths_are_cleaned_or_refused() {
        assert_eq!(clean_zip_path("./a//b/").unwrap().as_deref(), Some("a/b"));
        assert_eq!(clean_zip_path("./").unwrap(), None);
        assert!(matches!(
            clean_zip_path("/etc/passwd"),
            Err(CodeError::AbsolutePath(_))
        ));
        assert!(matches!(
            clean_zip_path("C:\\x"),
            Err(CodeError::AbsolutePath(_))
        ));
        assert!(matches!(
            clean_zip_path("a/../../x"),
            Err(CodeError::ParentDir(_))
        ));
        assert!(matches!(
            clean_zip_path("a\\..\\x"),
            Err(CodeError::ParentDir(_))
        ));
    }

    #[test]
    fn links_that_stay_inside_pass() {
        let m = manifest(&[
            ("node_modules", DIR),
            ("node_modules/.bin", DIR),
            ("node_modules/.bin/x", link("../pkg/bin/x")),
            ("here", link(".")),
            ("dangling", link("nowhere/at/all")),
        ]);
        assert_eq!(m.check(), Ok(()));
    }

    #[test]
    fn links_that_leave_through_other_links_are_refused() {
        // Read lexically, "up/../x" stays inside; through "up" -> ".." it does not.
        let m = manifest(&[("a", DIR), ("a/up", link("..")), ("a/esc", link("up/../x"))]);
        assert!(
            matches!(m.check(), Err(CodeError::EscapingSymlink { path, .. }) if path == "a/esc")
        );
        let m = manifest(&[("abs", link("/etc/passwd"))]);
        assert!(matches!(m.check(), Err(CodeError::EscapingSymlink { .. })));
        let m = manifest(&[("loop1", link("loop2")), ("loop2", link("loop1/x"))]);
        assert!(matches!(m.check(), Err(CodeError::EscapingSymlink { .. })));
    }

    #[test]
    fn paths_through_links_conflict() {
        let m = manifest(&[
            ("l", link("d")),
            (
                "l/f",
                Node::File {
                    size: 1,
                    mode: 0o644,
                },
            ),
        ]);
        assert_eq!(m.check(), Err(CodeError::Conflict("l".to_string())));
    }

    #[test]
    fn handlers_follow_each_runtime() {
        let file = |mode| Node::File { size: 1, mode };
        let m = manifest(&[
            ("app.py", file(0o644)),
            ("pkg", DIR),
            ("pkg/mod.py", file(0o644)),
            ("index.mjs", file(0o644)),
        ]);
        assert_eq!(check_handler(&m, Runtime::Python, "app.handler"), Ok(()));
        assert_eq!(
            check_handler(&m, Runtime::Python, "pkg.mod.handler"),
            Ok(())
        );
        assert!(matches!(
            check_handler(&m, Runtime::Python, "nope.handler"),
            Err(CodeError::MissingHandler { .. })
        ));
        assert!(matches!(
            check_handler(&m, Runtime::Python, "handler"),
            Err(CodeError::BadHandler { .. })
        ));
        assert_eq!(check_handler(&m, Runtime::Node, "index.handler"), Ok(()));
        // Nested handlers: a module's attributes, a file's properties.
        assert_eq!(
            check_handler(&m, Runtime::Python, "app.nested.deep"),
            Ok(())
        );
        assert_eq!(
            check_handler(&m, Runtime::Python, "pkg.mod.obj.handler"),
            Ok(())
        );
        assert_eq!(
            check_handler(&m, Runtime::Node, "index.nested.deep"),
            Ok(())
        );
        assert_eq!(
            check_handler(&m, Runtime::Node, "pkg/index.handler"),
            Err(CodeError::MissingHandler {
                handler: "pkg/index.handler".into(),
                expected: "pkg/index.js or pkg/index.mjs or pkg/index.cjs".into(),
            })
        );
        assert!(matches!(
            check_handler(&m, Runtime::Python, "nope.nested.deep"),
            Err(CodeError::MissingHandler { .. })
        ));
        // Code with its own executable bootstrap runs it: any handler goes.
        let own = manifest(&[("bootstrap", file(0o755))]);
        assert_eq!(check_handler(&own, Runtime::Provided, "anything"), Ok(()));
        assert_eq!(
            check_handler(&own, Runtime::Python, "app.nested.deep"),
            Ok(())
        );
        assert_eq!(check_handler(&own, Runtime::Node, "whatever"), Ok(()));
        let not_executable = manifest(&[("bootstrap", file(0o644))]);
        assert!(matches!(
            check_handler(&not_executable, Runtime::Python, "app.handler"),
            Err(CodeError::MissingHandler { .. })
        ));
        assert!(matches!(
            check_handler(&not_executable, Runtime::ProvidedDebian, "x"),
            Err(CodeError::MissingHandler { .. })
        ));
    }
}
