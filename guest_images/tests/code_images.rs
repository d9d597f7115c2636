//! Function code → `/var/task`: folders and zips become ext4 images with their modes, and
//! every unsafe or invalid package is refused with nothing written. Layers → `/opt`: the
//! same, unpacked in order into one image.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use common::{cat, ls, mode_of, temp_cache};
use kindling_images::{build_code_image, build_layers_image, Cache, CodeError, Runtime};
use zip::write::SimpleFileOptions;

/// A zip with the given entries: (name, unix mode, contents); mode 0o120777 makes a symlink.
fn make_zip(path: &Path, entries: &[(&str, u32, &[u8])]) {
    let mut zip = zip::ZipWriter::new(fs::File::create(path).unwrap());
    for (name, mode, data) in entries {
        let options = SimpleFileOptions::default().unix_permissions(*mode & 0o777);
        if mode & 0o170000 == 0o120000 {
            zip.add_symlink(*name, std::str::from_utf8(data).unwrap(), options)
                .unwrap();
        } else if name.ends_with('/') {
            zip.add_directory(*name, options).unwrap();
        } else {
            zip.start_file(*name, options).unwrap();
            zip.write_all(data).unwrap();
        }
    }
    zip.finish().unwrap();
}

/// Nothing but the empty scaffolding is in the cache.
fn assert_cache_untouched(cache: &Cache) {
    assert!(
        !cache.root().join("code").exists(),
        "a refused package reached the cache"
    );
    assert_eq!(
        fs::read_dir(cache.root().join("tmp")).unwrap().count(),
        0,
        "a refused package left temp files"
    );
}

#[test]
fn folder_becomes_an_ext4_image_with_modes_and_links() {
    let (dir, cache) = temp_cache();
    let src = dir.path().join("fn");
    fs::create_dir_all(src.join("lib/pkg")).unwrap();
    fs::write(src.join("app.py"), "def handler(e, c):\n    return e\n").unwrap();
    fs::write(src.join("lib/pkg/tool"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(src.join("lib/pkg/tool"), fs::Permissions::from_mode(0o750)).unwrap();
    symlink("lib/pkg/tool", src.join("tool")).unwrap();

    let image = build_code_image(&cache, &src, Runtime::Python, "app.handler").unwrap();
    assert!(!image.cached);
    let names: Vec<_> = ls(&image.ext4, "/").into_iter().map(|(n, _)| n).collect();
    for want in ["app.py", "lib", "tool"] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from / of the code image: {names:?}"
        );
    }
    assert_eq!(mode_of(&image.ext4, "/app.py") & 0o7777, 0o644);
    assert_eq!(mode_of(&image.ext4, "/lib/pkg/tool"), 0o100750);
    assert_eq!(mode_of(&image.ext4, "/tool") & 0o170000, 0o120000);
    assert_eq!(
        cat(&image.ext4, "/app.py"),
        fs::read(src.join("app.py")).unwrap()
    );
    assert_eq!(
        fs::read_link(image.dir.join("tool")).unwrap(),
        Path::new("lib/pkg/tool")
    );

    let again = build_code_image(&cache, &src, Runtime::Python, "app.handler").unwrap();
    assert!(again.cached, "an unchanged folder is a cache hit");
    assert_eq!(again.ext4, image.ext4);
    fs::write(src.join("app.py"), "changed = True\n").unwrap();
    let changed = build_code_image(&cache, &src, Runtime::Python, "app.handler").unwrap();
    assert!(!changed.cached, "changed code gets a new image");
    assert_ne!(changed.ext4, image.ext4);
}

#[test]
fn zip_keeps_executable_bits_and_hits_the_cache() {
    let (dir, cache) = temp_cache();
    let zip = dir.path().join("fn.zip");
    make_zip(
        &zip,
        &[
            ("bootstrap", 0o755, b"#!/bin/sh\necho hi\n"),
            ("function.sh", 0o644, b"handler() { :; }\n"),
            ("bin/", 0o755, b""),
            ("bin/helper", 0o700, b"\x7fELF"),
            ("run", 0o120777, b"bin/helper"),
            ("deep/er/data.txt", 0o600, b"implied folders"),
        ],
    );
    let image =
        build_code_image(&cache, &zip, Runtime::ProvidedDebian, "function.handler").unwrap();
    assert_eq!(mode_of(&image.ext4, "/bootstrap"), 0o100755);
    assert_eq!(mode_of(&image.ext4, "/function.sh"), 0o100644);
    assert_eq!(mode_of(&image.ext4, "/bin/helper"), 0o100700);
    assert_eq!(mode_of(&image.ext4, "/run") & 0o170000, 0o120000);
    assert_eq!(mode_of(&image.ext4, "/deep/er"), 0o40755);
    assert_eq!(mode_of(&image.ext4, "/deep/er/data.txt"), 0o100600);
    assert_eq!(cat(&image.ext4, "/bootstrap"), b"#!/bin/sh\necho hi\n");
    assert_eq!(
        fs::metadata(image.dir.join("bootstrap"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );

    let started = std::time::Instant::now();
    let again =
        build_code_image(&cache, &zip, Runtime::ProvidedDebian, "function.handler").unwrap();
    assert!(again.cached);
    assert!(
        started.elapsed().as_millis() < 1000,
        "a cache hit took {:?}",
        started.elapsed()
    );
}

/// Builds a zip of `entries` and expects `build_code_image` to refuse it with `want`.
fn refused(
    entries: &[(&str, u32, &[u8])],
    runtime: Runtime,
    handler: &str,
    want: fn(&CodeError) -> bool,
) {
    let (dir, cache) = temp_cache();
    let zip = dir.path().join("fn.zip");
    make_zip(&zip, entries);
    let before: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let err =
        build_code_image(&cache, &zip, runtime, handler).expect_err("the package must be refused");
    let code_err = err
        .downcast_ref::<CodeError>()
        .unwrap_or_else(|| panic!("not a CodeError: {err:#}"));
    assert!(want(code_err), "wrong rejection: {code_err}");
    assert!(!code_err.to_string().is_empty());
    assert_cache_untouched(&cache);
    let after: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(before, after, "nothing may be written next to the package");
}

const HANDLER: (&str, u32, &[u8]) = ("app.py", 0o644, b"def handler(e, c): pass\n");

#[test]
fn zip_with_absolute_path_is_refused() {
    refused(
        &[HANDLER, ("/etc/evil", 0o644, b"x")],
        Runtime::Python,
        "app.handler",
        |e| matches!(e, CodeError::AbsolutePath(p) if p == "/etc/evil"),
    );
}

#[test]
fn zip_with_parent_dir_is_refused() {
    refused(
        &[HANDLER, ("lib/../../evil", 0o644, b"x")],
        Runtime::Python,
        "app.handler",
        |e| matches!(e, CodeError::ParentDir(_)),
    );
}

#[test]
fn zip_with_escaping_symlink_is_refused() {
    refused(
        &[HANDLER, ("passwd", 0o120777, b"../../../etc/passwd")],
        Runtime::Python,
        "app.handler",
        |e| matches!(e, CodeError::EscapingSymlink { path, .. } if path == "passwd"),
    );
    refused(
        &[HANDLER, ("root", 0o120777, b"/")],
        Runtime::Python,
        "app.handler",
        |e| matches!(e, CodeError::EscapingSymlink { .. }),
    );
}

#[test]
fn zip_over_250_mb_unzipped_is_refused() {
    let big = vec![0u8; 251 * 1024 * 1024];
    refused(
        &[HANDLER, ("big.bin", 0o644, &big)],
        Runtime::Python,
        "app.handler",
        |e| matches!(e, CodeError::TooLarge { bytes } if *bytes > 250 * 1024 * 1024),
    );
}

#[test]
fn zip_without_the_handler_file_is_refused() {
    refused(
        &[HANDLER],
        Runtime::Python,
        "main.handler",
        |e| matches!(e, CodeError::MissingHandler { expected, .. } if expected.contains("main.py")),
    );
    refused(
        &[("index.py", 0o644, b"")],
        Runtime::Node,
        "index.handler",
        |e| matches!(e, CodeError::MissingHandler { expected, .. } if expected.contains("index.js")),
    );
    refused(
        &[("bootstrap", 0o644, b"#!/bin/sh\n")],
        Runtime::Provided,
        "x",
        |e| matches!(e, CodeError::MissingHandler { .. }),
    );
}

#[test]
fn folder_with_escaping_symlink_is_refused() {
    let (dir, cache) = temp_cache();
    let src = dir.path().join("fn");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("app.py"), "").unwrap();
    symlink("../../outside", src.join("leak")).unwrap();
    let err = build_code_image(&cache, &src, Runtime::Python, "app.handler").unwrap_err();
    assert!(
        matches!(err.downcast_ref(), Some(CodeError::EscapingSymlink { .. })),
        "{err:#}"
    );
    assert_cache_untouched(&cache);
}

#[test]
fn not_a_zip_is_refused_clearly() {
    let (dir, cache) = temp_cache();
    let zip = dir.path().join("broken.zip");
    fs::write(&zip, b"not a zip at all").unwrap();
    let err = build_code_image(&cache, &zip, Runtime::Python, "app.handler").unwrap_err();
    assert!(format!("{err:#}").contains("not a valid zip"), "{err:#}");
    let err = build_code_image(
        &cache,
        &dir.path().join("missing"),
        Runtime::Python,
        "app.handler",
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("cannot read the function code"),
        "{err:#}"
    );
    assert_cache_untouched(&cache);
}

#[test]
fn zip_that_understates_its_size_is_refused_while_unpacking() {
    let (dir, cache) = temp_cache();
    let zip = dir.path().join("liar.zip");
    let big = vec![0u8; 251 * 1024 * 1024];
    make_zip(&zip, &[HANDLER, ("big.bin", 0o644, &big)]);
    // Rewrite big.bin's uncompressed size to 1 byte in its local and central headers.
    let mut bytes = fs::read(&zip).unwrap();
    let name = b"big.bin";
    for (signature, size_at, name_at) in [(b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)] {
        let at = (0..bytes.len() - name_at - name.len())
            .find(|&i| {
                &bytes[i..i + 4] == signature
                    && &bytes[i + name_at..i + name_at + name.len()] == name
            })
            .expect("header of big.bin");
        bytes[at + size_at..at + size_at + 4].copy_from_slice(&1u32.to_le_bytes());
    }
    fs::write(&zip, bytes).unwrap();

    let err = build_code_image(&cache, &zip, Runtime::Python, "app.handler").unwrap_err();
    assert!(
        // The zip crate stops at the declared size itself; our byte budget is the backstop.
        matches!(err.downcast_ref(), Some(CodeError::TooLarge { .. }))
            || format!("{err:#}").contains("larger than its declared uncompressed size"),
        "refused for the wrong reason: {err:#}"
    );
    assert!(
        !cache
            .root()
            .join("code")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()),
        "nothing is published"
    );
    assert_eq!(
        fs::read_dir(cache.root().join("tmp")).unwrap().count(),
        0,
        "the partial unpack is gone"
    );
}

#[test]
fn layers_unpack_in_order_into_one_image() {
    let (dir, cache) = temp_cache();
    let first = dir.path().join("first");
    fs::create_dir_all(first.join("python/pkg")).unwrap();
    fs::create_dir_all(first.join("bin")).unwrap();
    fs::write(first.join("python/pkg/__init__.py"), "first").unwrap();
    fs::write(first.join("python/pkg/only_first.py"), "kept").unwrap();
    fs::write(first.join("bin/tool"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(first.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    let second = dir.path().join("second.zip");
    make_zip(
        &second,
        &[
            ("python/pkg/__init__.py", 0o100644, b"second"),
            ("lib/libx.so", 0o100755, b"\x7fELF"),
            ("lib/liby.so", 0o120777, b"libx.so"),
        ],
    );
    let image = build_layers_image(&cache, &[first.clone(), second.clone()]).unwrap();
    assert!(!image.cached);
    assert_eq!(cat(&image.ext4, "/python/pkg/__init__.py"), b"second");
    assert_eq!(cat(&image.ext4, "/python/pkg/only_first.py"), b"kept");
    assert_eq!(mode_of(&image.ext4, "/bin/tool"), 0o100755);
    assert_eq!(mode_of(&image.ext4, "/lib/libx.so"), 0o100755);
    assert_eq!(mode_of(&image.ext4, "/lib/liby.so") & 0o170000, 0o120000);
    assert_eq!(
        fs::read_to_string(image.dir.join("python/pkg/__init__.py")).unwrap(),
        "second"
    );
    // The order is part of what is built.
    let again = build_layers_image(&cache, &[first.clone(), second.clone()]).unwrap();
    assert!(again.cached);
    let reversed = build_layers_image(&cache, &[second.clone(), first.clone()]).unwrap();
    assert!(!reversed.cached);
    assert_eq!(cat(&reversed.ext4, "/python/pkg/__init__.py"), b"first");
}

#[test]
fn unsafe_layers_and_too_many_are_refused_naming_the_layer() {
    let (dir, cache) = temp_cache();
    let escaping = dir.path().join("escaping.zip");
    make_zip(&escaping, &[("python/x.py", 0o120777, b"../../etc/passwd")]);
    let good = dir.path().join("good");
    fs::create_dir(&good).unwrap();
    let err = build_layers_image(&cache, &[good.clone(), escaping.clone()]).unwrap_err();
    match err.downcast_ref::<CodeError>() {
        Some(CodeError::Layer { layer, error }) => {
            assert_eq!(layer, &escaping);
            assert!(
                matches!(**error, CodeError::EscapingSymlink { .. }),
                "{error}"
            );
        }
        other => panic!("{other:?}: {err:#}"),
    }
    assert!(err
        .to_string()
        .starts_with(&format!("layer {}: symlink", escaping.display())));
    let six = vec![good.clone(); 6];
    let err = build_layers_image(&cache, &six).unwrap_err();
    assert_eq!(
        err.downcast_ref::<CodeError>(),
        Some(&CodeError::TooManyLayers(6))
    );
    let missing = dir.path().join("missing");
    let err = build_layers_image(&cache, std::slice::from_ref(&missing)).unwrap_err();
    assert!(format!("{err:#}").contains("missing"), "{err:#}");
    assert_cache_untouched(&cache);
}
