//! The one table `kindling bench` prints: medians over the runs of each run's numbers,
//! ratios taken within each run, and a `†` on every number that this host's instruction
//! emulation (QEMU TCG) bounds.

use std::collections::BTreeMap;
use std::time::Duration;

use comfy_table::{CellAlignment, ContentArrangement, Table};
use kindling_microvm::probe;
use kindling_runtime_api::config::Hypervisor;
use kindling_runtime_api::{hops, Isolation};

use super::rss::ProgramRss;
use super::stats::{median, percentile};
use super::target::{self, NoOp, Run, SnapStartRun, Target, CLIENTS};

/// Column separators and a rule under the header; no other lines.
const STYLE: &str = "     --             ";
/// The mark on emulation-bound numbers.
const EMULATED: &str = " †";
/// A start phase that runs on the host, not in the guest: never emulation-bound.
const HOST_PHASE: &str = "Hypervisor Start";
/// The start phase from the guest kernel's start to its init (the guest's clock).
const GUEST_BOOT: &str = "Guest Boot";

/// Everything measured, run by run.
pub struct Results {
    /// Round-trip pairs of the floor, one list per run.
    pub floor: Vec<Vec<Duration>>,
    /// The CPU of one of the floor's round-trip pairs, one per run.
    pub floor_cpu: Vec<Duration>,
    pub targets: Vec<(Target, Vec<Run>)>,
    /// Why kindling-vmm was not measured, when it cannot run here.
    pub kindling_unavailable: Option<String>,
    /// What the footnote says about emulation, when some target was emulated.
    pub emulation: Option<String>,
}

impl Results {
    /// No runs yet, for `targets`; says what this host cannot measure or only emulates.
    pub fn new(targets: &[Target], runs: usize) -> Self {
        let kvm = probe::kvm();
        let microvms = targets.iter().any(|t| t.isolation == Isolation::MicroVm);
        let kindling = targets.contains(&Target::microvm(Hypervisor::Kindling));
        Self {
            floor: Vec::with_capacity(runs),
            floor_cpu: Vec::with_capacity(runs),
            targets: targets
                .iter()
                .map(|t| (*t, Vec::with_capacity(runs)))
                .collect(),
            kindling_unavailable: (microvms && !kindling && !kvm.can_boot_linux)
                .then(|| kvm.reason.clone()),
            emulation: if target::nested() {
                Some(
                    "measured inside the nested-KVM harness (a QEMU TCG guest with emulated SVM, \
                     whose KVM runs every microVM here): nested TCG, only ratios mean anything"
                        .to_string(),
                )
            } else {
                targets.iter().any(Target::emulated).then(|| {
                    format!(
                        "microVM guests run under QEMU TCG here ({}); compare such numbers with metal only side by side",
                        kvm.reason
                    )
                })
            },
        }
    }
}

/// The table and its footnotes, ready to print.
pub fn render(results: &Results) -> String {
    let mut rows = Rows::default();
    let floor_p50: Vec<f64> = results.floor.iter().map(|r| p(r, 0.5)).collect();
    let floor_p99: Vec<f64> = results.floor.iter().map(|r| p(r, 0.99)).collect();
    let loopback = "loopback (hyper)";
    rows.push(
        "floor: 2 HTTP round trips, p50",
        loopback,
        seconds(median_of(&floor_p50)),
        "",
    );
    rows.push(
        "floor: 2 HTTP round trips, p99",
        loopback,
        seconds(median_of(&floor_p99)),
        "",
    );
    // Round-trip pairs per second, each run's.
    let floor_rate: Vec<f64> = results
        .floor
        .iter()
        .map(|r| r.len() as f64 / r.iter().sum::<Duration>().as_secs_f64())
        .collect();
    rows.push(
        "floor: round-trip pairs per second",
        loopback,
        format!("{:.0} /s", median_of(&floor_rate)),
        "",
    );
    let floor_cpu: Vec<f64> = results
        .floor_cpu
        .iter()
        .map(Duration::as_secs_f64)
        .collect();
    rows.push_noted(
        "floor: CPU per round-trip pair",
        loopback,
        format!("{:.0} µs", median_of(&floor_cpu) * 1e6),
        "",
        "client and server together: this machine's price of two loopback exchanges",
    );
    let floor = Floor {
        p50: &floor_p50,
        p99: &floor_p99,
        rate: &floor_rate,
        cpu: &floor_cpu,
    };
    for (target, runs) in &results.targets {
        target_rows(&mut rows, *target, runs, &floor);
    }
    hypervisor_rows(&mut rows, results);
    if let Some(reason) = &results.kindling_unavailable {
        rows.push_noted(
            "hypervisor RSS per microVM, less guest RAM",
            "microVM kindling-vmm",
            "n/a".to_string(),
            "",
            &format!("n/a: {reason}"),
        );
    }

    let mut table = Table::new();
    table
        .load_preset(STYLE)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(["measurement", "environment", "median", "× floor", "note"]);
    for (index, alignment) in [(2, CellAlignment::Right), (3, CellAlignment::Right)] {
        if let Some(column) = table.column_mut(index) {
            column.set_cell_alignment(alignment);
        }
    }
    for row in rows.0 {
        table.add_row(row);
    }
    let mut out = table.trim_fmt();
    out.push('\n');
    let runs = results.floor.len();
    out.push_str(&format!(
        "Medians of {runs} run(s); each run starts a fresh server, so its first invocation is a cold start \
         (a no-op python handler, and in the sandbox a no-op `provided` lambda_runtime program too); ratios are taken within each run. {CLIENTS} clients use {CLIENTS} environments.\n"
    ));
    if let Some(why) = &results.emulation {
        out.push_str(&format!("† bound by this machine's emulation: {why}\n"));
    }
    out
}

/// Each run's floor: p50 and p99 of a round-trip pair (s), pairs per second, CPU per
/// pair (s).
struct Floor<'a> {
    p50: &'a [f64],
    p99: &'a [f64],
    rate: &'a [f64],
    cpu: &'a [f64],
}

/// The rows of one target: warm invokes, their hops and CPU, what the server held, the
/// cold start and its phases, the hypervisor's RSS.
fn target_rows(rows: &mut Rows, target: Target, runs: &[Run], floor: &Floor<'_>) {
    warm_rows(rows, target, runs, floor);
    hop_rows(rows, target, runs);
    cpu_rows(rows, target, runs, floor.cpu);
    held_rows(rows, target, runs);
    cold_start_rows(rows, target, runs);
    snapstart_rows(rows, target, runs);
    rss_row(rows, target, runs);
}

/// SnapStart: a snapshot-restored cold start against a booted one of the same function
/// (the snapshot it took excluded), each the first invocation of a fresh server; the
/// target is a restore at most 1/5 of the boot. Where the target cannot take snapshots,
/// one row says why.
fn snapstart_rows(rows: &mut Rows, target: Target, runs: &[Run]) {
    let env = target.label();
    if let Err(why) = target.snapstart() {
        if target.isolation == Isolation::MicroVm {
            rows.push_noted("SnapStart restore → answer", env, "n/a".into(), "", &why);
        }
        return;
    }
    let snap: Vec<_> = runs.iter().filter_map(|r| r.snapstart.as_ref()).collect();
    let of =
        |f: fn(&SnapStartRun) -> f64| median_of(&snap.iter().map(|s| f(s)).collect::<Vec<_>>());
    let booted = of(|s| s.booted.as_secs_f64());
    let restored = of(|s| s.restored.as_secs_f64());
    let ratio = of(|s| s.booted.as_secs_f64() / s.restored.as_secs_f64().max(1e-9));
    rows.push_noted(
        "SnapStart boot → answer",
        env,
        marked(target, seconds(booted)),
        "",
        &format!(
            "fresh server, snapshot taken on the way ({}) not counted",
            seconds(of(|s| s.snapshot.as_secs_f64()))
        ),
    );
    rows.push_noted(
        "SnapStart first restore → answer",
        env,
        marked(target, seconds(of(|s| s.first_restored.as_secs_f64()))),
        "",
        "fresh server; the snapshot's first clone (kindling-vmm: records its working set)",
    );
    rows.push_noted(
        "SnapStart restore → answer",
        env,
        marked(target, seconds(restored)),
        "",
        &format!(
            "fresh server, a later clone; 1/{ratio:.1} of the boot (target: at most 1/5){}",
            if ratio >= 5.0 { "" } else { " MISSED" }
        ),
    );
    restore_phase_rows(rows, target, &snap);
}

/// Where a restored cold start's time goes, phase after phase (each the median of its
/// runs), from its `REPORT`: the host's part before the VMM, the jail, the snapshot load,
/// the resumed guest until the runtime's `/next` reaches the host, the invocation itself,
/// and the rest (the invocation's way in and the answer's way out).
fn restore_phase_rows(rows: &mut Rows, target: Target, snap: &[&SnapStartRun]) {
    let env = target.label();
    let phase = |s: &SnapStartRun, name: &str| target::phase_ms(&s.restored_phases, name);
    // Each phase of one run, in seconds; `None` where its REPORT lacks a field.
    let phases = |s: &SnapStartRun| -> Option<[f64; 6]> {
        let restore = phase(s, "Restore Duration")?;
        let in_guest = phase(s, "Billed Restore Duration")?;
        let hypervisor = phase(s, "Hypervisor Start")?;
        let jail = phase(s, "Jail Start")?;
        let load = phase(s, "Snapshot Load")?;
        let invoke = s.restored_duration_ms;
        let total = s.restored.as_secs_f64() * 1000.0;
        Some(
            [
                restore - in_guest - hypervisor,
                jail,
                load,
                in_guest,
                invoke,
                total - restore - invoke,
            ]
            .map(|ms| ms / 1000.0),
        )
    };
    let measured: Vec<[f64; 6]> = snap.iter().filter_map(|s| phases(s)).collect();
    if measured.is_empty() {
        return;
    }
    let names = [
        (
            "  restore: host, before the VMM",
            "images, VM user, snapshot lookup",
        ),
        ("  restore: jailer → VMM API answers", "jail set-up, exec"),
        ("  restore: snapshot load and resume", "PUT /snapshot/load"),
        (
            "  restore: resumed → runtime's /next on host",
            "Billed Restore Duration: vsock reset, the agent reconnects",
        ),
        ("  restore: event → result", "the REPORT's Duration"),
        (
            "  restore: rest",
            "invoke → environment start, result → answer",
        ),
    ];
    for (i, (name, note)) in names.into_iter().enumerate() {
        let value = median_of(&measured.iter().map(|m| m[i]).collect::<Vec<_>>());
        rows.push_noted(name, env, marked(target, seconds(value)), "", note);
    }
}

/// kindling-vmm against QEMU where both were measured: each ratio taken within a run (both
/// ran on this machine minutes apart), with the targets of issue #14.
fn hypervisor_rows(rows: &mut Rows, results: &Results) {
    let runs_of = |hypervisor| {
        results
            .targets
            .iter()
            .find(|(t, _)| *t == Target::microvm(hypervisor))
            .map(|(_, runs)| runs)
    };
    let (Some(kindling), Some(qemu)) = (runs_of(Hypervisor::Kindling), runs_of(Hypervisor::Qemu))
    else {
        return;
    };
    let ratio = |of_kindling: &dyn Fn(&Run) -> Option<f64>,
                 of_qemu: &dyn Fn(&Run) -> Option<f64>| {
        let per_run: Vec<f64> = kindling
            .iter()
            .zip(qemu)
            .filter_map(|(k, q)| Some(of_kindling(k)? / of_qemu(q)?))
            .collect();
        median_of(&per_run)
    };
    let boot = ratio(&|r| phase(r, GUEST_BOOT), &|r| phase(r, GUEST_BOOT));
    let cold = |r: &Run| Some(r.cold_total.as_secs_f64());
    let cold = ratio(&cold, &cold);
    let rss = ratio(
        &|r| Some(own_rss_per_vm(Target::microvm(Hypervisor::Kindling), r)),
        &|r| Some(own_rss_per_vm(Target::microvm(Hypervisor::Qemu), r)),
    );
    let verdict = |met: bool| if met { "" } else { " MISSED" };
    let env = "kindling-vmm ÷ qemu";
    rows.push_noted(
        "guest boot (kernel → init)",
        env,
        format!("{boot:.2}×"),
        "",
        &format!("target: at most 1×{}", verdict(boot <= 1.0)),
    );
    rows.push(
        "cold start, invoke → answer",
        env,
        format!("{cold:.2}×"),
        "",
    );
    rows.push_noted(
        "hypervisor RSS per microVM, less guest RAM",
        env,
        format!("{rss:.2}×"),
        "",
        &format!("target: at most 0.10×{}", verdict(rss <= 0.1)),
    );
}

/// `text` with the emulation mark where the target's figures are bound by emulation.
fn marked(target: Target, text: String) -> String {
    if target.emulated() || target::nested() {
        text + EMULATED
    } else {
        text
    }
}

/// Warm invoke latency (p50, p99, each as a ratio to the floor) and throughput (1 client
/// as a ratio to the floor's pairs per second, more clients to 1 client), each with the
/// target it is held to.
fn warm_rows(rows: &mut Rows, target: Target, runs: &[Run], floor: &Floor<'_>) {
    let env = target.label();
    for (name, q, floors, most, note) in [
        ("p50", 0.5, floor.p50, 2.0, "ratio to the floor's p50"),
        ("p99", 0.99, floor.p99, 3.0, "ratio to the floor's p99"),
    ] {
        let values: Vec<f64> = runs.iter().map(|r| p(&r.warm, q)).collect();
        let ratios = median(values.iter().zip(floors).map(|(v, f)| v / f));
        let mut note = format!(
            "{note}; {}",
            verdict(ratios.is_some_and(|r| r <= most), &format!("≤ {most}×"))
        );
        if name == "p50" && target.isolation == Isolation::MicroVm {
            let met = median_of(&values) <= MICROVM_WARM_P50;
            note = format!("{note}; {}", verdict(met, "≤ 3 ms"));
        }
        rows.push_noted(
            &format!("warm invoke, {name}"),
            env,
            marked(target, seconds(median_of(&values))),
            &ratio(ratios),
            &note,
        );
    }
    let rate = |rate: fn(&Run) -> f64| marked(target, format!("{:.0} /s", median_over(runs, rate)));
    let to_floor = median(
        runs.iter()
            .zip(floor.rate)
            .map(|(r, f)| r.sequential_rate / f),
    );
    rows.push_noted(
        "throughput, 1 client",
        env,
        rate(|r| r.sequential_rate),
        &ratio(to_floor),
        &format!(
            "ratio to the floor's pairs/s; {}",
            verdict(to_floor.is_some_and(|r| r >= 0.5), "≥ 0.5×")
        ),
    );
    let scaling = median(runs.iter().map(|r| r.concurrent_rate / r.sequential_rate));
    rows.push_noted(
        &format!("throughput, {CLIENTS} clients"),
        env,
        rate(|r| r.concurrent_rate),
        "",
        &format!(
            "{} 1 client; {}",
            ratio(scaling),
            verdict(scaling.is_some_and(|r| r >= 1.6), "≥ 1.6×")
        ),
    );
}

/// A microVM's warm invoke p50 target.
const MICROVM_WARM_P50: f64 = 3e-3;
/// CPU per warm invoke, server and environment together, for the no-op function.
const CPU_PER_INVOKE: f64 = 60e-6;

/// `target: met` or `target: NOT met`.
fn verdict(met: bool, target: &str) -> String {
    format!("target {target}: {}", if met { "met" } else { "NOT met" })
}

/// Where a sequential warm invoke's time goes (median µs of each hop, `kindling serve
/// --trace-hops`), the caller's share first.
fn hop_rows(rows: &mut Rows, target: Target, runs: &[Run]) {
    let env = target.label();
    let mut names: Vec<&str> = Vec::new();
    for run in runs {
        for (name, _) in &run.hops {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    for name in names {
        let us = median_over(runs, |r| {
            r.hops
                .iter()
                .find(|(n, _)| n == name)
                .map_or(f64::NAN, |(_, us)| *us)
        });
        let about = hops::HOPS.iter().find(|(n, _)| *n == name).map_or(
            "HTTP both ways, hyper on both ends (invoke less every other hop)",
            |(_, about)| about,
        );
        rows.push_noted(
            &format!("  hop: {name}"),
            env,
            marked(target, format!("{us:.1} µs")),
            "",
            about,
        );
    }
}

/// CPU of one sequential warm invoke: the server's, the environment's, and together, that
/// also as a ratio to the CPU of the floor's round-trip pair in the same run.
fn cpu_rows(rows: &mut Rows, target: Target, runs: &[Run], floor_cpu: &[f64]) {
    let env = target.label();
    let server = median_over(runs, |r| r.cpu_per_invoke.server.as_secs_f64());
    let environment = median_over(runs, |r| r.cpu_per_invoke.environments.as_secs_f64());
    let total_of =
        |r: &Run| (r.cpu_per_invoke.server + r.cpu_per_invoke.environments).as_secs_f64();
    let total = median_over(runs, total_of);
    let to_floor = median(runs.iter().zip(floor_cpu).map(|(r, f)| total_of(r) / f));
    rows.push_noted(
        "CPU per warm invoke, server",
        env,
        format!("{:.0} µs", server * 1e6),
        "",
        "the bench's process less its client's thread",
    );
    rows.push_noted(
        "CPU per warm invoke, environment",
        env,
        marked(target, format!("{:.0} µs", environment * 1e6)),
        "",
        "every process of the environments (runtime, agent, hypervisor)",
    );
    rows.push_noted(
        "CPU per warm invoke, total",
        env,
        marked(target, format!("{:.0} µs", total * 1e6)),
        &ratio(to_floor),
        &format!(
            "ratio to the floor's CPU per pair; {}",
            verdict(total <= CPU_PER_INVOKE, "≤ 60 µs")
        ),
    );
}

/// The server's resident memory and open fds before and after the sequential warm
/// invokes, the last run's.
fn held_rows(rows: &mut Rows, target: Target, runs: &[Run]) {
    let Some(run) = runs.last() else {
        return;
    };
    let env = target.label();
    let (before, after) = run.held;
    let invokes = run.warm.len();
    rows.push_noted(
        "server RSS, before → after",
        env,
        format!(
            "{} → {}",
            mib(before.rss_bytes as f64),
            mib(after.rss_bytes as f64)
        ),
        "",
        &format!("over {invokes} sequential warm invokes (last run)"),
    );
    rows.push_noted(
        "server fds, before → after",
        env,
        format!("{} → {}", before.fds, after.fds),
        "",
        &format!("over {invokes} sequential warm invokes (last run)"),
    );
}

/// The cold start, its phases as the `REPORT` line gives them, and the time no phase covers.
fn cold_start_rows(rows: &mut Rows, target: Target, runs: &[Run]) {
    let env = target.label();
    let total = median_over(runs, |r| r.cold_total.as_secs_f64());
    let note = match (target.isolation, target.runtime) {
        (Isolation::Sandbox, NoOp::Provided) => verdict(total <= 20e-3, "≤ 20 ms"),
        (Isolation::Sandbox, NoOp::Python) => verdict(total <= 45e-3, "≤ 45 ms"),
        (Isolation::MicroVm, _) => String::new(),
    };
    rows.push_noted(
        "cold start, invoke → answer",
        env,
        marked(target, seconds(total)),
        "",
        &note,
    );
    for name in phase_names(runs) {
        let values: Vec<f64> = runs
            .iter()
            .filter_map(|r| phase(r, &name))
            .map(|ms| ms / 1000.0)
            .collect();
        let value = seconds(median_of(&values));
        // The host's own phase runs natively even where the guest is emulated.
        let value = if name == HOST_PHASE {
            value
        } else {
            marked(target, value)
        };
        let note = PHASE_NOTES
            .iter()
            .find_map(|(phase, note)| (*phase == name).then_some(*note))
            .unwrap_or("");
        rows.push_noted(&format!("  {name}"), env, value, "", note);
    }
    let rest = median_over(runs, |r| {
        r.cold_total.as_secs_f64() - r.cold_phases.iter().map(|(_, ms)| ms / 1000.0).sum::<f64>()
    });
    let rest_note = match target.hypervisor {
        None => {
            "the host before the sandbox (its folder, Runtime API socket), the invocation itself"
        }
        Some(_) => {
            "kernel loading before the guest's clock starts, vsock connect, the invocation itself"
        }
    };
    rows.push_noted(
        "  rest (total − phases)",
        env,
        marked(target, seconds(rest)),
        "",
        rest_note,
    );
}

/// The hypervisor's (and its helpers') RSS per microVM, less the guest's RAM; no row for
/// the sandbox.
fn rss_row(rows: &mut Rows, target: Target, runs: &[Run]) {
    let programs = target.hypervisor_programs();
    let Some(hypervisor) = programs.first() else {
        return;
    };
    let parts: Vec<String> = programs
        .iter()
        .map(|p| {
            format!(
                "{p} {}",
                mib(median_over(runs, |r| per_vm(r, hypervisor, p, |p| p.bytes)))
            )
        })
        .collect();
    let guest = median_over(runs, |r| sum_per_vm(target, r, |p| p.guest_bytes));
    let vms = runs
        .last()
        .map_or(0, |r| vm_count(&r.children_rss, hypervisor));
    rows.push_noted(
        "hypervisor RSS per microVM, less guest RAM",
        target.label(),
        marked(
            target,
            mib(median_over(runs, |r| own_rss_per_vm(target, r))),
        ),
        "",
        &format!(
            "VmRSS per VM, mean of {vms} running: {}, less the guest RAM they map ({})",
            parts.join(" + "),
            mib(guest)
        ),
    );
}

/// The RSS of one VM's processes (hypervisor and helpers) in `run`, less guest RAM.
fn own_rss_per_vm(target: Target, run: &Run) -> f64 {
    sum_per_vm(target, run, |p| p.bytes) - sum_per_vm(target, run, |p| p.guest_bytes)
}

/// `bytes` of every program of one VM of `target`, per VM: helpers are one per VM, like the
/// hypervisor, so each sum is divided by the VM count.
fn sum_per_vm(target: Target, run: &Run, bytes: fn(&ProgramRss) -> u64) -> f64 {
    let programs = target.hypervisor_programs();
    programs.first().map_or(f64::NAN, |hypervisor| {
        programs
            .iter()
            .map(|p| per_vm(run, hypervisor, p, bytes))
            .sum()
    })
}

fn per_vm(run: &Run, hypervisor: &str, program: &str, bytes: fn(&ProgramRss) -> u64) -> f64 {
    let vms = vm_count(&run.children_rss, hypervisor).max(1);
    run.children_rss.get(program).map_or(0, bytes) as f64 / vms as f64
}

fn vm_count(children: &BTreeMap<String, ProgramRss>, hypervisor: &str) -> usize {
    children.get(hypervisor).map_or(0, |h| h.processes)
}

/// What a cold start's phases cover, where the name does not say it all.
const PHASE_NOTES: [(&str, &str); 4] = [
    (
        "Sandbox Setup",
        "namespaces + mounts: ids, cgroup, the root, until init runs",
    ),
    (
        "Init Start",
        "init: its mounts, cgroup and network, until the agent runs",
    ),
    (
        "Agent Start",
        "agent ready: its configuration from the host, extensions, runtime started",
    ),
    (
        INIT_DURATION,
        "runtime ready: runtime started → its first /next",
    ),
];
/// The runtime's own start, which the `REPORT` line names first and which comes last.
const INIT_DURATION: &str = "Init Duration";

/// The start phases reported by any run, in the order the `REPORT` line gives them, but
/// with `Init Duration` (the runtime's start) after the phases before it.
fn phase_names(runs: &[Run]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (name, _) in runs.iter().flat_map(|r| &r.cold_phases) {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    if let Some(at) = names.iter().position(|n| n == INIT_DURATION) {
        let init = names.remove(at);
        names.push(init);
    }
    names
}

fn phase(run: &Run, name: &str) -> Option<f64> {
    run.cold_phases
        .iter()
        .find_map(|(n, ms)| (n == name).then_some(*ms))
}

/// The rows: measurement, environment, median, ratio to the floor, note.
#[derive(Default)]
struct Rows(Vec<[String; 5]>);

impl Rows {
    fn push(&mut self, measurement: &str, env: &str, value: String, ratio: &str) {
        self.push_noted(measurement, env, value, ratio, "");
    }

    fn push_noted(&mut self, measurement: &str, env: &str, value: String, ratio: &str, note: &str) {
        self.0.push([
            measurement.to_string(),
            env.to_string(),
            value,
            ratio.to_string(),
            note.to_string(),
        ]);
    }
}

/// A quantile of one run's samples, in seconds (NaN for no samples, shown as "—").
fn p(samples: &[Duration], q: f64) -> f64 {
    percentile(samples, q).map_or(f64::NAN, |d| d.as_secs_f64())
}

/// The median over the runs of one number of each run (NaN for none).
fn median_over(runs: &[Run], number: impl Fn(&Run) -> f64) -> f64 {
    median_of(&runs.iter().map(number).collect::<Vec<_>>())
}

fn median_of(values: &[f64]) -> f64 {
    median(values.iter().copied().filter(|v| v.is_finite())).unwrap_or(f64::NAN)
}

/// Seconds as µs, ms or s, three significant digits or so.
fn seconds(s: f64) -> String {
    match s {
        s if !s.is_finite() => "—".to_string(),
        s if s < 1e-3 => format!("{:.0} µs", s * 1e6),
        s if s < 1.0 => format!("{:.2} ms", s * 1e3),
        s => format!("{s:.2} s"),
    }
}

fn ratio(r: Option<f64>) -> String {
    r.filter(|r| r.is_finite())
        .map_or_else(|| "—".to_string(), |r| format!("{r:.1}×"))
}

fn mib(bytes: f64) -> String {
    if bytes.is_finite() {
        format!("{:.1} MiB", bytes / (1u64 << 20) as f64)
    } else {
        "—".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::super::cpu::{CpuSpent, Held};
    use super::*;

    fn run(warm_ms: u64, rss: &[(&str, usize, u64)]) -> Run {
        Run {
            cold_total: Duration::from_millis(100),
            cold_phases: vec![("Init Duration".to_string(), 60.0)],
            warm: vec![Duration::from_millis(warm_ms); 10],
            sequential_rate: 1000.0 / warm_ms as f64,
            concurrent_rate: 2000.0 / warm_ms as f64,
            snapstart: None,
            cpu_per_invoke: CpuSpent::default(),
            hops: vec![("read".to_string(), 2.0)],
            held: (Held::default(), Held::default()),
            children_rss: rss
                .iter()
                .map(|&(program, processes, mib)| {
                    let rss = ProgramRss {
                        processes,
                        bytes: mib << 20,
                        shmem_bytes: 0,
                        guest_bytes: (mib / 2) << 20,
                    };
                    (program.to_string(), rss)
                })
                .collect(),
        }
    }

    fn row<'a>(table: &'a str, measurement: &str, env: &str) -> &'a str {
        table
            .lines()
            .find(|l| l.trim_start().starts_with(measurement) && l.contains(env))
            .unwrap_or_else(|| panic!("no {measurement:?} row for {env} in:\n{table}"))
    }

    #[test]
    fn ratios_are_taken_within_each_run_and_rss_is_per_vm() {
        let floor = |us: u64| vec![Duration::from_micros(us); 10];
        let qemu = Target::microvm(Hypervisor::Qemu);
        let vms = [
            ("qemu-system-x86_64", 2, 200),
            ("vhost-device-vsock", 2, 10),
        ];
        let mut results = Results::new(&[Target::SANDBOX, qemu], 3);
        results.floor = vec![floor(100), floor(50), floor(100)];
        results.floor_cpu = [100, 50, 200].map(Duration::from_micros).to_vec();
        let with_cpu = |mut run: Run| {
            run.cpu_per_invoke = CpuSpent {
                server: Duration::from_micros(200),
                environments: Duration::from_micros(100),
            };
            run
        };
        results.targets = vec![
            (
                Target::SANDBOX,
                [run(1, &[]), run(2, &[]), run(3, &[])]
                    .map(with_cpu)
                    .to_vec(),
            ),
            (qemu, vec![run(10, &vms), run(10, &vms), run(10, &vms)]),
        ];
        let table = render(&results);
        // 300 µs against 100, 50 and 200 µs: 3×, 6×, 1.5×.
        let cpu = row(&table, "CPU per warm invoke, total", "sandbox");
        assert!(cpu.contains("300 µs") && cpu.contains("3.0×"), "{cpu}");
        assert!(row(&table, "floor: CPU per round-trip pair", "loopback").contains("100 µs"));
        // Per run 10×, 40×, 30×: the median of the ratios, not the ratio of the medians (20×).
        let warm = row(&table, "warm invoke, p50", "sandbox");
        assert!(warm.contains("2.00 ms") && warm.contains("30.0×"), "{warm}");
        assert!(row(&table, "floor: 2 HTTP round trips, p50", "loopback").contains("100 µs"));
        assert!(row(&table, "throughput, 4 clients", "sandbox").contains("1000 /s"));
        assert!(row(&table, "Init Duration", "sandbox").contains("60.00 ms"));
        assert!(row(&table, "rest (total − phases)", "sandbox").contains("40.00 ms"));
        let rss = row(&table, "hypervisor RSS per microVM", qemu.label());
        // (200 + 10) MiB over 2 VMs, half of it guest RAM.
        assert!(
            rss.contains("52.5 MiB") && rss.contains("mean of 2 running"),
            "{rss}"
        );
        assert_eq!(rss.contains('†'), qemu.emulated(), "{rss}");
        assert!(!warm.contains('†'), "the sandbox is never emulated: {warm}");
        let kindling = table.lines().any(|l| l.contains("n/a: "));
        assert_eq!(kindling, results.kindling_unavailable.is_some(), "{table}");
    }

    #[test]
    fn kindling_vmm_is_compared_with_qemu_run_by_run() {
        let kindling = Target::microvm(Hypervisor::Kindling);
        let qemu = Target::microvm(Hypervisor::Qemu);
        let with_boot = |mut run: Run, boot_ms: f64| {
            run.cold_phases.push((GUEST_BOOT.to_string(), boot_ms));
            run
        };
        let mut results = Results::new(&[kindling, qemu], 1);
        results.floor = vec![vec![Duration::from_micros(100); 10]];
        results.targets = vec![
            (
                kindling,
                vec![with_boot(run(10, &[("kindling-vmm", 4, 12)]), 500.0)],
            ),
            (
                qemu,
                vec![with_boot(
                    run(
                        10,
                        &[
                            ("qemu-system-x86_64", 2, 100),
                            ("vhost-device-vsock", 2, 20),
                        ],
                    ),
                    1000.0,
                )],
            ),
        ];
        let table = render(&results);
        let row = |measurement: &str| row(&table, measurement, "kindling-vmm ÷ qemu").to_string();
        assert!(
            row("guest boot (kernel → init)").contains("0.50×"),
            "{table}"
        );
        assert!(
            !row("guest boot (kernel → init)").contains("MISSED"),
            "{table}"
        );
        // Per VM, less half for guest RAM: 1.5 MiB against (50 + 10) / 2 = 30 MiB.
        let rss = row("hypervisor RSS per microVM, less guest RAM");
        assert!(rss.contains("0.05×") && !rss.contains("MISSED"), "{table}");
    }

    #[test]
    fn a_restore_is_broken_into_phases_that_add_up_to_it() {
        let kindling = Target::microvm(Hypervisor::Kindling);
        let mut measured = run(10, &[("kindling-vmm", 1, 10)]);
        let phases = [
            ("Restore Duration", 5000.0),
            ("Billed Restore Duration", 4000.0),
            ("Hypervisor Start", 900.0),
            ("Jail Start", 500.0),
            ("Snapshot Load", 350.0),
        ];
        measured.snapstart = Some(SnapStartRun {
            booted: Duration::from_secs(50),
            snapshot: Duration::from_secs(5),
            first_restored: Duration::from_secs(9),
            restored: Duration::from_secs(8),
            restored_phases: phases.map(|(n, ms)| (n.to_string(), ms)).to_vec(),
            restored_duration_ms: 2000.0,
        });
        let mut results = Results::new(&[kindling], 1);
        results.floor = vec![vec![Duration::from_micros(100); 10]];
        results.targets = vec![(kindling, vec![measured])];
        let table = render(&results);
        let env = kindling.label();
        let restored = row(&table, "SnapStart restore → answer", env);
        assert!(
            restored.contains("8.00 s")
                && restored.contains("1/6.2")
                && !restored.contains("MISSED"),
            "{table}"
        );
        // 5 s to the first /next, of which 4 s in the guest and 0.9 s starting the VMM;
        // 2 s of invocation; the 1 s left of the 8 s is the rest.
        for (phase, value) in [
            ("restore: host, before the VMM", "100.00 ms"),
            ("restore: jailer → VMM API answers", "500.00 ms"),
            ("restore: snapshot load and resume", "350.00 ms"),
            ("restore: resumed → runtime's /next on host", "4.00 s"),
            ("restore: event → result", "2.00 s"),
            ("restore: rest", "1.00 s"),
        ] {
            assert!(row(&table, phase, env).contains(value), "{phase}: {table}");
        }
    }

    #[test]
    fn durations_pick_a_readable_unit() {
        assert_eq!(seconds(0.000_052), "52 µs");
        assert_eq!(seconds(0.0123), "12.30 ms");
        assert_eq!(seconds(2.5), "2.50 s");
        assert_eq!(seconds(f64::NAN), "—");
        assert_eq!(ratio(Some(6.53)), "6.5×");
        assert_eq!(mib(3.0 * 1048576.0), "3.0 MiB");
    }
}
