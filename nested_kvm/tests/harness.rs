//! The harness itself, through a real level-1 boot: a job's output, exit status and files
//! come back, and L1 has a working `/dev/kvm` with nested paging.

use kindling_nested_kvm::{run, Job};

#[test]
fn a_job_sees_its_files_and_a_real_kvm_and_reports_its_status() {
    let data = std::env::temp_dir().join(format!("nested-harness-{}.txt", std::process::id()));
    std::fs::write(&data, "packed at its host path\n").unwrap();
    let script = format!(
        "cat '{}'\n\
         echo \"kvm: $(ls /dev/kvm)\"\n\
         echo \"npt: $(cat /sys/module/kvm_amd/parameters/npt)\"\n\
         echo \"marker=$KINDLING_TEST_MARKER\"\n\
         echo to-stderr >&2\n\
         exit 7",
        data.display()
    );
    let outcome = run(&Job::new(script)
        .file(&data)
        .env("KINDLING_TEST_MARKER", "it's here"))
    .unwrap();
    std::fs::remove_file(&data).unwrap();
    println!("{}", outcome.timing());
    assert_eq!(outcome.status, Some(7), "{outcome:?}");
    let lines: Vec<&str> = outcome.output.lines().collect();
    assert_eq!(
        lines,
        [
            "packed at its host path",
            "kvm: /dev/kvm",
            "npt: Y",
            "marker=it's here",
            "to-stderr"
        ],
        "{}",
        outcome.console
    );
    assert!(outcome.boot.is_some());
}
