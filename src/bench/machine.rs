//! What the machine did while an open-loop round ran, read from `/proc`
//! (Linux): the cores kept busy by the server under test, by this process
//! (the load generator, which shares the machine with it), by everything
//! else and by the hypervisor (steal), and how long the server's threads
//! were ready to run but waiting for a CPU.
//!
//! Latency at half load is taken with the generator on the same cores as
//! the server: these figures, beside each round's p99, say how busy the
//! machine was and who kept it busy. They are averages over the round, so
//! they show sustained load, not a stall of a few milliseconds (which can
//! be enough to move a p99). Each figure is `None` where `/proc` cannot be
//! read (other systems, a process that has exited).

use std::time::{Duration, Instant};

use serde::Serialize;

/// CPU time a process has used so far (user + system, its exited threads
/// included), from `/proc/PID/stat`.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_process_ticks(&stat).and_then(ticks)
}

/// utime + stime, in clock ticks, from the text of `/proc/PID/stat`.
fn parse_process_ticks(stat: &str) -> Option<u64> {
    // Fields after the command name, which is in parentheses and may hold
    // spaces: utime and stime are the 12th and 13th of those.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// Clock ticks as a duration.
fn ticks(count: u64) -> Option<Duration> {
    // SAFETY: sysconf has no memory effects.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_sec = u64::try_from(per_sec).ok().filter(|t| *t > 0)?;
    Some(Duration::from_secs_f64(count as f64 / per_sec as f64))
}

/// The whole machine's CPU time, from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MachineTicks {
    /// Every state but idle and waiting for I/O: user (guests included),
    /// nice, system, interrupts and steal.
    busy: u64,
    /// Time the hypervisor ran something else while this machine's CPUs
    /// had work.
    steal: u64,
}

fn parse_machine_ticks(stat: &str) -> Option<MachineTicks> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]:
    // guest time is already counted in user.
    let field = |i: usize| values.get(i).copied();
    let steal = field(7).unwrap_or(0);
    let busy = [field(0)?, field(1)?, field(2)?, field(5)?, field(6)?, steal]
        .iter()
        .try_fold(0u64, |sum, v| sum.checked_add(*v))?;
    Some(MachineTicks { busy, steal })
}

/// Nanoseconds a process's live threads have waited on a run queue (ready,
/// not running), summed from `/proc/PID/task/*/schedstat`. A thread that
/// exits takes its waits with it, so across a round where one did the
/// difference errs short (and saturates at zero); the sidecar's workers
/// live as long as it does.
fn run_delay(pid: u32) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    let mut read_any = false;
    for task in tasks.flatten() {
        // A thread may exit between the listing and the read.
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        if let Some(waited) = parse_run_delay(&text) {
            total = total.saturating_add(waited);
            read_any = true;
        }
    }
    read_any.then(|| Duration::from_nanos(total))
}

/// The second field of a `schedstat` line: time spent waiting to run, ns.
fn parse_run_delay(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().nth(1)?.parse().ok()
}

/// Readings taken before a round, to be compared with those after it.
#[derive(Debug, Clone, Copy)]
pub struct Before {
    at: Instant,
    machine: Option<MachineTicks>,
    server_cpu: Option<Duration>,
    server_wait: Option<Duration>,
    own_cpu: Option<Duration>,
}

impl Before {
    /// Reads the machine, the server `server_pid` and this process now.
    pub fn read(server_pid: u32) -> Self {
        Self {
            at: Instant::now(),
            machine: read_machine(),
            server_cpu: process_cpu(server_pid),
            server_wait: run_delay(server_pid),
            own_cpu: process_cpu(std::process::id()),
        }
    }

    /// What happened since, over `calls` calls made to the server.
    pub fn load_since(&self, server_pid: u32, calls: u64) -> Load {
        let after = Self::read(server_pid);
        let seconds = after.at.saturating_duration_since(self.at).as_secs_f64();
        let cores = |d: Option<Duration>| {
            d.filter(|_| seconds > 0.0)
                .map(|d| d.as_secs_f64() / seconds)
        };
        let delta = |a: Option<Duration>, b: Option<Duration>| Some(a?.saturating_sub(b?));
        let machine_ticks = match (after.machine, self.machine) {
            (Some(a), Some(b)) => Some((
                a.busy.saturating_sub(b.busy),
                a.steal.saturating_sub(b.steal),
            )),
            _ => None,
        };
        let machine_cores = cores(machine_ticks.and_then(|(busy, _)| ticks(busy)));
        let steal_cores = cores(machine_ticks.and_then(|(_, steal)| ticks(steal)));
        let server_cores = cores(delta(after.server_cpu, self.server_cpu));
        let bench_cores = cores(delta(after.own_cpu, self.own_cpu));
        // Not clamped: the machine's busy time comes from the state sampled
        // at each clock tick, the processes' from their exact run times, so
        // the remainder is only good to about a tenth of a core either way
        // (it reads -0.16 to +0.12 on an otherwise idle 2-core VM), and a
        // negative remainder says so rather than hiding it.
        let others_cores = match (machine_cores, server_cores, bench_cores) {
            (Some(m), Some(s), Some(b)) => Some(m - s - b),
            _ => None,
        };
        let per_call = |d: Option<Duration>| {
            d.filter(|_| calls > 0)
                .map(|d| d.as_secs_f64() * 1e6 / calls as f64)
        };
        Load {
            seconds,
            machine_cores,
            server_cores,
            bench_cores,
            others_cores,
            steal_cores,
            server_wait_us_per_call: per_call(delta(after.server_wait, self.server_wait)),
        }
    }
}

fn read_machine() -> Option<MachineTicks> {
    parse_machine_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The machine over one round (warm-up and drain included), each figure in
/// cores: CPU seconds per second of the round.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Load {
    /// The round's length, the span the figures are averaged over.
    pub seconds: f64,
    /// The whole machine: every process, the kernel, interrupts and steal.
    pub machine_cores: Option<f64>,
    /// The server under test.
    pub server_cores: Option<f64>,
    /// `leash bench` itself: the load generator, and the reading of the
    /// server's log.
    pub bench_cores: Option<f64>,
    /// Everything else: other processes and the kernel's own threads. It
    /// is the machine less the two above, which are measured differently
    /// (sampled at clock ticks against exact run times), so it is good to
    /// about ±0.1 cores and may be negative: a lot of other work shows, a
    /// short burst does not.
    pub others_cores: Option<f64>,
    /// Time the hypervisor gave this machine's CPUs to someone else, as far
    /// as the machine reports it (some report none).
    pub steal_cores: Option<f64>,
    /// Time the server's threads were ready to run but waited for a CPU,
    /// per call.
    pub server_wait_us_per_call: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_ticks_are_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 1 0 0 0 \
                    170 23 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_process_ticks(stat), Some(193));
        assert_eq!(parse_process_ticks("4242 (cut) S 1 2"), None);
    }

    #[test]
    fn machine_busy_counts_every_state_but_idle_and_io_wait() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let stat = "cpu  100 20 30 5000 70 4 6 8 50 0\ncpu0 1 2 3 4 5 6 7 8 9 0\n";
        assert_eq!(
            parse_machine_ticks(stat),
            Some(MachineTicks {
                busy: 100 + 20 + 30 + 4 + 6 + 8,
                steal: 8
            })
        );
        // Old kernels end the line before steal.
        assert_eq!(
            parse_machine_ticks("cpu  1 2 3 4 5 6 7\n"),
            Some(MachineTicks {
                busy: 1 + 2 + 3 + 6 + 7,
                steal: 0
            })
        );
        assert_eq!(parse_machine_ticks("cpu  1 x 3 4 5 6 7\n"), None);
        assert_eq!(parse_machine_ticks("intr 1 2 3\n"), None);
    }

    #[test]
    fn run_delay_is_the_second_schedstat_field() {
        assert_eq!(parse_run_delay("746700 5120 3\n"), Some(5120));
        assert_eq!(parse_run_delay("746700\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_s_own_work_shows_as_its_cores() {
        let pid = std::process::id();
        let before = Before::read(pid);
        // Spin until this process has used at least three clock ticks, so
        // the readings cannot be equal whatever the machine's speed.
        let start_cpu = process_cpu(pid).expect("own /proc/PID/stat");
        let give_up = Instant::now() + Duration::from_secs(30);
        let mut spins = 0u64;
        while process_cpu(pid)
            .expect("own /proc/PID/stat")
            .saturating_sub(start_cpu)
            < Duration::from_millis(30)
        {
            assert!(Instant::now() < give_up, "no CPU time counted in 30 s");
            spins = std::hint::black_box(spins.wrapping_add(1));
        }
        let load = before.load_since(pid, 10);
        let server = load.server_cores.expect("server cores");
        let bench = load.bench_cores.expect("bench cores");
        assert!(server > 0.0 && bench > 0.0, "{load:?}");
        assert!(load.machine_cores.expect("machine cores") > 0.0, "{load:?}");
        // Here the "server" is this process too, so its work is counted
        // twice and the remainder means nothing; it is still computed.
        assert!(load.others_cores.is_some(), "{load:?}");
        assert!(load.steal_cores.is_some(), "{load:?}");
        assert!(load.server_wait_us_per_call.is_some(), "{load:?}");
        assert!(load.seconds > 0.0, "{load:?}");
    }
}
