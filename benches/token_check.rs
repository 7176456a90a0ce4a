//! The hot-path token check (`Registry::authorize`) on a resident registry.
//!
//! Groups:
//! - `token_hash`: `TokenHash::of` alone (SHA-256 of a 46-byte secret), so
//!   the map probe + chain walk + grant test can be read off as the rest.
//! - `floor`: the hash, then one read of a random 128-byte line in a
//!   table as large as the token table's (200,000 slots): what any design
//!   that must touch one token-specific line outside the cache costs on
//!   this machine, measured in the same run as the hits.
//! - `authorize`: single-thread hits (mixed depths, depth-1 only (every
//!   device: no list to search), depth-3 only, one hot
//!   token) and misses (unknown secrets), over a 100,000-token registry
//!   (the target of issue 14: a hit within 2× the hash alone).
//! - `rate_admit`: the whole per-request check of the HTTP path
//!   (`with_grant`: hash, probe, verdict and grant test; then
//!   `TokenEntry::admit`) for a depth-4 token of which 0 to 4 levels carry
//!   a rate limit, so the cost added per limited level (one atomic
//!   compare-and-swap each) can be read off in one run; and `admit` alone
//!   on the same tokens, where the hash no longer hides it.
//! - `authorize_concurrent`: reader threads doing hits through one shared
//!   harness: one reader alone, two readers alone, two readers while a third
//!   thread keeps minting, revoking/reactivating and removing tokens (paced
//!   and flat out), and a control where two threads only hash (shared
//!   nothing), which shows how far this machine itself scales. Each reader
//!   does `iters` checks; the time reported is from the first reader's
//!   start to the last one's finish, i.e. per-check latency as one reader
//!   sees it when they overlap (aggregate rate = readers / that time). The
//!   aggregate rate and the CPUs the process actually got (from
//!   `/proc/self/stat`) are printed after each function: on a shared
//!   machine two readers may not get two CPUs.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ring::rand::SystemRandom;
use sluice::auth::{Devices, RateLimit, Registry, Scope, Scopes, Status, TokenRecord};
use sluice::secret::{TokenHash, TokenSecret};

const APPS: usize = 10;
const ROOTS: usize = 20_000;
/// Children per root; every second child gets one grandchild.
const CHILDREN: usize = 3;
const NOW_MS: i64 = 1_700_000_000_000;

/// Length of a generated secret (`sl_` and 43 characters).
const SECRET_LEN: usize = 46;

/// What one token may be asked to do, with a request it permits. Probes
/// are compact and their strings sit in one arena in probe order, so the
/// harness reads one probe's data from adjacent memory and adds no cache
/// misses of its own to the checks (as in the broker, where the request's
/// application and device come from a path it has just parsed).
struct Probe {
    secret: [u8; SECRET_LEN],
    app: std::ops::Range<usize>,
    device: std::ops::Range<usize>,
    depth: u8,
}

/// A probe while the fixture is built.
struct RawProbe {
    secret: Vec<u8>,
    app: String,
    device: String,
    depth: u8,
}

struct Fixture {
    registry: Registry,
    /// One probe per token, in a scrambled order.
    hits: Vec<Probe>,
    /// The probes' application and device ids, back to back.
    arena: String,
    /// Secrets of depth-3 tokens only.
    deep: Vec<usize>,
    /// Secrets of depth-1 tokens only (every device of their application).
    roots: Vec<usize>,
    /// Tokens that no reader uses; the admin thread flips their status.
    spare_ids: Vec<String>,
}

fn new_token(
    id: String,
    app: &str,
    scopes: Scopes,
    devices: Devices,
    parent: Option<String>,
    hash: TokenHash,
) -> TokenRecord {
    TokenRecord {
        id,
        app: app.to_string(),
        name: "bench".to_string(),
        scopes,
        devices,
        expires_at: Some(NOW_MS + 86_400_000),
        status: Status::Active,
        deactivated_by: None,
        parent_id: parent,
        created_at: NOW_MS - 1000,
        last_used: None,
        rate_limit: None,
        hash,
    }
}

fn secret(rng: &SystemRandom) -> Vec<u8> {
    TokenSecret::generate(rng)
        .expect("rng")
        .expose()
        .as_bytes()
        .to_vec()
}

/// A deterministic shuffle (xorshift), so probes do not walk insertion order.
fn scramble<T>(v: &mut [T]) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

impl Fixture {
    fn app(&self, p: &Probe) -> &str {
        &self.arena[p.app.clone()]
    }

    fn device(&self, p: &Probe) -> &str {
        &self.arena[p.device.clone()]
    }
}

fn build() -> Fixture {
    let rng = SystemRandom::new();
    let registry = Registry::new();
    let mut hits = Vec::new();
    let mut spare_ids = Vec::new();
    let all = Scopes::of(&[Scope::AllApplication]);
    let send_get = Scopes::of(&[Scope::SendState, Scope::GetState]);
    let send = Scopes::of(&[Scope::SendState]);
    let mut n = 0usize;
    for r in 0..ROOTS {
        let app = format!("app-{:02}", r % APPS);
        let root_id = format!("tok-{n:08}");
        n += 1;
        let s = secret(&rng);
        registry
            .insert(new_token(
                root_id.clone(),
                &app,
                all,
                Devices::All,
                None,
                TokenHash::of(&s),
            ))
            .unwrap();
        hits.push(RawProbe {
            secret: s,
            app: app.clone(),
            device: format!("dev-{:05}", r * 7),
            depth: 1,
        });
        for c in 0..CHILDREN {
            let base = (r * CHILDREN + c) * 8;
            let devs: Vec<String> = (0..8).map(|i| format!("dev-{:05}", base + i)).collect();
            let child_id = format!("tok-{n:08}");
            n += 1;
            let s = secret(&rng);
            registry
                .insert(new_token(
                    child_id.clone(),
                    &app,
                    send_get,
                    Devices::only(devs.clone()),
                    Some(root_id.clone()),
                    TokenHash::of(&s),
                ))
                .unwrap();
            // The last child of every root is kept for the admin thread.
            if c == CHILDREN - 1 {
                spare_ids.push(child_id);
                continue;
            }
            hits.push(RawProbe {
                secret: s,
                app: app.clone(),
                device: devs[5].clone(),
                depth: 2,
            });
            if c.is_multiple_of(2) {
                let grand_id = format!("tok-{n:08}");
                n += 1;
                let s = secret(&rng);
                let gdevs = vec![devs[2].clone(), devs[6].clone()];
                registry
                    .insert(new_token(
                        grand_id,
                        &app,
                        send,
                        Devices::only(gdevs.clone()),
                        Some(child_id),
                        TokenHash::of(&s),
                    ))
                    .unwrap();
                hits.push(RawProbe {
                    secret: s,
                    app: app.clone(),
                    device: gdevs[1].clone(),
                    depth: 3,
                });
            }
        }
    }
    scramble(&mut hits);
    let mut arena = String::new();
    let mut add = |s: &str| {
        let start = arena.len();
        arena.push_str(s);
        start..arena.len()
    };
    let hits: Vec<Probe> = hits
        .into_iter()
        .map(|r| Probe {
            secret: r.secret.try_into().expect("secrets are SECRET_LEN bytes"),
            app: add(&r.app),
            device: add(&r.device),
            depth: r.depth,
        })
        .collect();
    let deep = (0..hits.len()).filter(|&i| hits[i].depth == 3).collect();
    let roots = (0..hits.len()).filter(|&i| hits[i].depth == 1).collect();
    let f = Fixture {
        registry,
        hits,
        arena,
        deep,
        roots,
        spare_ids,
    };
    for p in &f.hits {
        assert_eq!(
            f.registry.authorize(
                &p.secret,
                f.app(p),
                Some(f.device(p)),
                Scope::SendState,
                NOW_MS
            ),
            Ok(())
        );
    }
    f
}

fn bench_single(c: &mut Criterion, f: &Fixture) {
    eprintln!(
        "registry: {} tokens ({} probed as hits, {} of depth 3)",
        f.registry.len(),
        f.hits.len(),
        f.deep.len()
    );
    let rng = SystemRandom::new();
    let misses: Vec<Vec<u8>> = (0..4096).map(|_| secret(&rng)).collect();

    let mut g = c.benchmark_group("token_hash");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sha256_46B", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % f.hits.len();
            black_box(TokenHash::of(black_box(&f.hits[i].secret)))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("floor");
    g.throughput(Throughput::Elements(1));
    #[repr(align(128))]
    struct Line([u64; 16]);
    let lines: Vec<Line> = (0..2 * f.registry.len())
        .map(|i| Line([i as u64; 16]))
        .collect();
    let line_of = |secret: &[u8]| {
        let h = TokenHash::of(black_box(secret));
        let w = u64::from_le_bytes(h.0[..8].try_into().expect("8 bytes"));
        let at = ((u128::from(w) * lines.len() as u128) >> 64) as usize;
        black_box(lines[at].0[0])
    };
    g.bench_function("sha256_then_random_line", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % f.hits.len();
            line_of(&f.hits[i].secret)
        })
    });
    // The same over the depth-3 probes only, which `hit_depth3` reads.
    g.bench_function("sha256_then_random_line_depth3", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % f.deep.len();
            line_of(&f.hits[f.deep[i]].secret)
        })
    });
    g.finish();

    let mut g = c.benchmark_group("authorize");
    g.throughput(Throughput::Elements(1));
    // The request each probe was built to permit.
    let check = |p: &Probe| {
        f.registry.authorize(
            black_box(&p.secret),
            f.app(p),
            Some(f.device(p)),
            Scope::SendState,
            NOW_MS,
        )
    };
    g.bench_function("hit_mixed", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % f.hits.len();
            check(&f.hits[i])
        })
    });
    for (name, subset) in [("hit_depth1", &f.roots), ("hit_depth3", &f.deep)] {
        g.bench_function(name, |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % subset.len();
                check(&f.hits[subset[i]])
            })
        });
    }
    g.bench_function("hit_same_token", |b| {
        let p = &f.hits[f.deep[0]];
        b.iter(|| check(p))
    });
    g.bench_function("miss_unknown", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % misses.len();
            f.registry.authorize(
                black_box(&misses[i]),
                "app-00",
                Some("dev-00000"),
                Scope::SendState,
                NOW_MS,
            )
        })
    });
    g.finish();
}

/// Depth of the chains in `rate_admit`.
const RATE_DEPTH: usize = 4;

/// One chain of `RATE_DEPTH` tokens per number of limited levels (0 to
/// `RATE_DEPTH`, the limited ones at the bottom, as a child of a limited
/// parent must be limited); returns each chain's bottom secret.
fn rate_chains(registry: &Registry) -> Vec<Vec<u8>> {
    let rng = SystemRandom::new();
    let all = Scopes::of(&[Scope::AllApplication]);
    // One message costs 1 ns and the burst is ~4 s of them: with the clock
    // advanced 1 ns per check, no level ever refuses.
    let limit = RateLimit {
        per_second: 1_000_000_000,
        burst: u32::MAX,
    };
    (0..=RATE_DEPTH)
        .map(|limited| {
            let mut parent = None;
            let mut s = Vec::new();
            for level in 0..RATE_DEPTH {
                let id = format!("rate-{limited}-{level}");
                s = secret(&rng);
                let mut t = new_token(
                    id.clone(),
                    "app-rate",
                    all,
                    Devices::All,
                    parent.take(),
                    TokenHash::of(&s),
                );
                t.rate_limit = (level >= RATE_DEPTH - limited).then_some(limit);
                registry.insert(t).unwrap();
                parent = Some(id);
            }
            s
        })
        .collect()
}

fn bench_rate(c: &mut Criterion, f: &Fixture) {
    let chains = rate_chains(&f.registry);
    let mut g = c.benchmark_group("rate_admit");
    g.throughput(Throughput::Elements(1));
    for (limited, secret) in chains.iter().enumerate() {
        let mut now_ns = 0u64;
        let mut refused = 0u64;
        g.bench_function(format!("depth4_limited_levels_{limited}"), |b| {
            b.iter(|| {
                now_ns += 1;
                let r = f.registry.with_grant(black_box(secret), NOW_MS, |g| {
                    g.permits("app-rate", Some("dev"), Scope::SendState)
                        && g.entry().admit(1, now_ns).is_ok()
                });
                refused += u64::from(!matches!(black_box(r), Ok(true)));
            })
        });
        assert_eq!(
            refused, 0,
            "a check with {limited} limited levels was refused"
        );
    }
    for (limited, secret) in chains.iter().enumerate() {
        let entry = f.registry.authenticate(secret, NOW_MS).unwrap();
        let mut now_ns = 1u64 << 40;
        let mut refused = 0u64;
        g.bench_function(format!("admit_only_limited_levels_{limited}"), |b| {
            b.iter(|| {
                now_ns += 1;
                refused += u64::from(black_box(&entry).admit(1, now_ns).is_err());
            })
        });
        assert_eq!(
            refused, 0,
            "admit with {limited} limited levels was refused"
        );
    }
    g.finish();
}

/// How hard the admin thread works while readers check.
#[derive(Clone, Copy)]
enum Admin {
    Off,
    /// One insert or status flip, then a 100 µs sleep (≈ 10k ops/s).
    Paced,
    /// Flat out: every admin op back to back.
    FlatOut,
}

/// The admin thread: mints tokens (children of spare roots' children),
/// removes the oldest once more than `WINDOW` are extra so the registry
/// stays the same size, and flips spare tokens inactive/active.
fn admin_loop(f: &Fixture, stop: &AtomicBool, next_id: &AtomicU64, pace: Admin, ops: &AtomicU64) {
    const WINDOW: usize = 2_000;
    let rng = SystemRandom::new();
    let mut minted: std::collections::VecDeque<String> = Default::default();
    let send = Scopes::of(&[Scope::SendState]);
    let mut k = 0usize;
    let mut done = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let spare = &f.spare_ids[k % f.spare_ids.len()];
        if k.is_multiple_of(2) {
            let id = format!("new-{:010}", next_id.fetch_add(1, Ordering::Relaxed));
            let app = f.registry.record(spare).map(|v| v.app).unwrap_or_default();
            let s = secret(&rng);
            f.registry
                .insert(new_token(
                    id.clone(),
                    &app,
                    send,
                    Devices::only(["dev-x".to_string()]),
                    Some(spare.clone()),
                    TokenHash::of(&s),
                ))
                .unwrap();
            minted.push_back(id);
            if minted.len() > WINDOW {
                let old = minted.pop_front().unwrap();
                f.registry.remove_subtree(&old);
            }
        } else {
            // Each spare alternates between the two on successive visits.
            let status = if (k / f.spare_ids.len()).is_multiple_of(2) {
                Status::Inactive
            } else {
                Status::Active
            };
            f.registry.set_status(spare, status, None);
        }
        k += 1;
        done += 1;
        if matches!(pace, Admin::Paced) {
            thread::sleep(Duration::from_micros(100));
        }
    }
    for id in minted {
        f.registry.remove_subtree(&id);
    }
    for id in &f.spare_ids {
        f.registry.set_status(id, Status::Active, None);
    }
    ops.fetch_add(done, Ordering::Relaxed);
}

/// What each reader thread does per iteration.
#[derive(Clone, Copy)]
enum Work {
    Authorize,
    /// Only `TokenHash::of`: shared-nothing work, the machine's own scaling.
    HashOnly,
}

/// `readers` threads each do `iters` checks; returns the time from the
/// first reader's start to the last reader's finish.
fn run_readers(
    f: &Fixture,
    readers: usize,
    iters: u64,
    work: Work,
    pace: Admin,
    next_id: &AtomicU64,
    ops: &AtomicU64,
) -> Duration {
    let stop = AtomicBool::new(false);
    let admin = usize::from(!matches!(pace, Admin::Off));
    let start = Barrier::new(readers + admin);
    let times = Mutex::new(Vec::with_capacity(readers));
    thread::scope(|s| {
        if !matches!(pace, Admin::Off) {
            s.spawn(|| {
                start.wait();
                admin_loop(f, &stop, next_id, pace, ops);
            });
        }
        let handles: Vec<_> = (0..readers)
            .map(|r| {
                let (start, times) = (&start, &times);
                s.spawn(move || {
                    // Readers start at different places in the probe list.
                    let mut i = r * f.hits.len() / readers;
                    start.wait();
                    let mut denied = 0u64;
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        i += 1;
                        if i == f.hits.len() {
                            i = 0;
                        }
                        let p = &f.hits[i];
                        match work {
                            Work::HashOnly => {
                                black_box(TokenHash::of(black_box(&p.secret)));
                            }
                            Work::Authorize => {
                                let ok = f.registry.authorize(
                                    black_box(&p.secret),
                                    f.app(p),
                                    Some(f.device(p)),
                                    Scope::SendState,
                                    NOW_MS,
                                );
                                denied += u64::from(black_box(ok).is_err());
                            }
                        }
                    }
                    let t = (t0, Instant::now());
                    assert_eq!(denied, 0, "a reader's hit was denied");
                    times.lock().unwrap().push(t);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    // From the first reader's start to the last one's end: if the readers
    // did not actually overlap (no second CPU free), this shows it.
    let times = times.into_inner().unwrap();
    let first = times.iter().map(|t| t.0).min().unwrap();
    let last = times.iter().map(|t| t.1).max().unwrap();
    last - first
}

fn bench_concurrent(c: &mut Criterion, f: &Fixture) {
    let next_id = AtomicU64::new(0);
    let mut g = c.benchmark_group("authorize_concurrent");
    g.throughput(Throughput::Elements(1));
    for (name, readers, work, pace) in [
        ("1reader_no_admin", 1, Work::Authorize, Admin::Off),
        ("2readers_sha256_only", 2, Work::HashOnly, Admin::Off),
        ("2readers_no_admin", 2, Work::Authorize, Admin::Off),
        ("2readers_admin_paced", 2, Work::Authorize, Admin::Paced),
        (
            "2readers_admin_flat_out",
            2,
            Work::Authorize,
            Admin::FlatOut,
        ),
    ] {
        let ops = AtomicU64::new(0);
        let mut checks = 0u64;
        let mut wall = Duration::ZERO;
        let (cpu0, wall0) = (process_cpu(), Instant::now());
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let d = run_readers(f, readers, iters, work, pace, &next_id, &ops);
                checks += readers as u64 * iters;
                wall += d;
                d
            })
        });
        if checks == 0 {
            // Filtered out on the command line.
            continue;
        }
        let cpus = (process_cpu() - cpu0).as_secs_f64() / wall0.elapsed().as_secs_f64();
        let ops = ops.load(Ordering::Relaxed);
        if ops > 0 {
            eprintln!(
                "  {name}: admin did {:.0} ops/s of reader wall time",
                ops as f64 / wall.as_secs_f64()
            );
        }
        eprintln!(
            "  {name}: aggregate {:.2} M checks/s over all readers; the process used {cpus:.2} CPUs",
            checks as f64 / wall.as_secs_f64() / 1e6
        );
    }
    g.finish();
    // Every reader probe must still be a hit after all that churn.
    for p in &f.hits {
        assert_eq!(
            f.registry.authorize(
                &p.secret,
                f.app(p),
                Some(f.device(p)),
                Scope::SendState,
                NOW_MS
            ),
            Ok(())
        );
    }
}

/// Process CPU time (user + system, all threads) from `/proc/self/stat`.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    // Fields after the command: state is field 3, utime 14, stime 15.
    let f: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    // USER_HZ is 100 on every Linux configuration we run on.
    Duration::from_millis(f.iter().sum::<u64>() * 10)
}

fn benches(c: &mut Criterion) {
    let f = build();
    bench_single(c, &f);
    bench_rate(c, &f);
    bench_concurrent(c, &f);
}

criterion_group! {
    name = token_check;
    config = Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = benches
}
criterion_main!(token_check);
