//! Data-parallel training on libtorch's c10d engine (Gloo on CPU, NCCL on CUDA) through the
//! small C++ shim in `csrc/dist.cpp`: rendezvous from torchrun's or SLURM's environment,
//! parameter broadcast, bucketed gradient all-reduce, gathers for sharded evaluation, and the
//! DistributedSampler sharding of an epoch's order.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use tch::{Device, Tensor};

use crate::cli::DistArgs;

/// Gradients are all-reduced in flat buckets of at most this many bytes.
const BUCKET_BYTES: usize = 25 << 20;

/// Whether this process is rank 0 (or not distributed): the one that prints progress bars.
static NOT_MAIN: AtomicBool = AtomicBool::new(false);

/// False on ranks other than 0 of a distributed run.
pub fn is_main_process() -> bool {
    !NOT_MAIN.load(Ordering::Relaxed)
}

#[allow(unsafe_code)]
mod ffi {
    use super::*;

    extern "C" {
        pub fn mae_dist_last_error() -> *const c_char;
        pub fn mae_dist_nccl_available() -> c_int;
        pub fn mae_dist_init(
            backend: *const c_char,
            host: *const c_char,
            port: c_int,
            rank: c_int,
            world: c_int,
            timeout_ms: i64,
            interface: *const c_char,
            out: *mut *mut c_void,
        ) -> c_int;
        pub fn mae_dist_free(group: *mut c_void);
        pub fn mae_dist_allreduce_sum(group: *mut c_void, t: *const *mut c_void, n: c_int)
            -> c_int;
        pub fn mae_dist_broadcast(
            group: *mut c_void,
            t: *const *mut c_void,
            n: c_int,
            root: c_int,
        ) -> c_int;
        pub fn mae_dist_allgather(
            group: *mut c_void,
            input: *mut c_void,
            outputs: *const *mut c_void,
            world: c_int,
        ) -> c_int;
        pub fn mae_dist_barrier(group: *mut c_void) -> c_int;
    }

    /// The shim's last message, without libtorch's C++ stack trace.
    fn last_error() -> String {
        // SAFETY: the shim returns a pointer to a NUL-terminated thread-local string.
        let full = unsafe { CStr::from_ptr(mae_dist_last_error()) }
            .to_string_lossy()
            .into_owned();
        match full.find("\nException raised from") {
            Some(i) => full[..i].trim().to_string(),
            None => full.trim().to_string(),
        }
    }

    fn check(rc: c_int) -> Result<(), String> {
        if rc == 0 {
            Ok(())
        } else {
            Err(last_error())
        }
    }

    pub fn nccl_available() -> bool {
        // SAFETY: no arguments, no state.
        unsafe { mae_dist_nccl_available() != 0 }
    }

    /// A joined process group; freed on drop unless a collective failed (a failed group may
    /// have threads blocked on a dead peer, so it is left to the process exit).
    #[derive(Debug)]
    pub struct Group {
        ptr: *mut c_void,
        failed: std::cell::Cell<bool>,
    }

    impl Group {
        pub fn init(
            backend: &str,
            host: &str,
            port: u16,
            rank: usize,
            world: usize,
            timeout: Duration,
            interface: &str,
        ) -> Result<Self, String> {
            let c = |s: &str| CString::new(s).map_err(|_| format!("NUL byte in '{s}'"));
            let (b, h, i) = (c(backend)?, c(host)?, c(interface)?);
            let mut ptr = std::ptr::null_mut();
            // SAFETY: valid C strings and an out pointer; the shim catches all exceptions.
            check(unsafe {
                mae_dist_init(
                    b.as_ptr(),
                    h.as_ptr(),
                    c_int::from(port),
                    rank as c_int,
                    world as c_int,
                    timeout.as_millis() as i64,
                    i.as_ptr(),
                    &mut ptr,
                )
            })?;
            Ok(Self {
                ptr,
                failed: std::cell::Cell::new(false),
            })
        }

        fn guard(&self, rc: c_int) -> Result<(), String> {
            let r = check(rc);
            if r.is_err() {
                self.failed.set(true);
            }
            r
        }

        fn ptrs(ts: &mut [Tensor]) -> Vec<*mut c_void> {
            ts.iter_mut().map(|t| t.as_mut_ptr().cast()).collect()
        }

        pub fn allreduce_sum(&self, ts: &mut [Tensor]) -> Result<(), String> {
            let p = Self::ptrs(ts);
            // SAFETY: pointers to live tch tensors, valid for the call.
            self.guard(unsafe { mae_dist_allreduce_sum(self.ptr, p.as_ptr(), p.len() as c_int) })
        }

        pub fn broadcast(&self, ts: &mut [Tensor], root: usize) -> Result<(), String> {
            let p = Self::ptrs(ts);
            // SAFETY: as above.
            self.guard(unsafe {
                mae_dist_broadcast(self.ptr, p.as_ptr(), p.len() as c_int, root as c_int)
            })
        }

        pub fn allgather(&self, input: &mut Tensor, outs: &mut [Tensor]) -> Result<(), String> {
            let p = Self::ptrs(outs);
            // SAFETY: as above; `outs` has one tensor per rank, shaped as `input`.
            self.guard(unsafe {
                mae_dist_allgather(
                    self.ptr,
                    input.as_mut_ptr().cast(),
                    p.as_ptr(),
                    p.len() as c_int,
                )
            })
        }

        pub fn barrier(&self) -> Result<(), String> {
            // SAFETY: a live group.
            self.guard(unsafe { mae_dist_barrier(self.ptr) })
        }
    }

    impl Drop for Group {
        fn drop(&mut self) {
            if !self.failed.get() {
                // SAFETY: created by mae_dist_init, freed once.
                unsafe { mae_dist_free(self.ptr) }
            }
        }
    }
}

/// Where this process sits in a distributed run, read from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl Placement {
    /// torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`),
    /// else SLURM's (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, the first host of
    /// `SLURM_JOB_NODELIST`); `None` when neither is set (one process).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Option<Self>> {
        let num = |name: &str| -> anyhow::Result<Option<usize>> {
            get(name)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .with_context(|| format!("environment variable {name}={v} is not a number"))
                })
                .transpose()
        };
        let port = match get("MASTER_PORT") {
            Some(v) => v
                .trim()
                .parse::<u16>()
                .with_context(|| format!("environment variable MASTER_PORT={v} is not a port"))?,
            None => 29500,
        };
        let p = if let (Some(rank), Some(world)) = (num("RANK")?, num("WORLD_SIZE")?) {
            Placement {
                rank,
                world,
                local_rank: num("LOCAL_RANK")?.unwrap_or(0),
                master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
                master_port: port,
            }
        } else if let (Some(rank), Some(world)) = (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
            let addr = match get("MASTER_ADDR") {
                Some(a) => a,
                None => {
                    let list = get("SLURM_JOB_NODELIST")
                        .or_else(|| get("SLURM_NODELIST"))
                        .context("SLURM_PROCID is set but SLURM_JOB_NODELIST is not")?;
                    first_host(&list)?
                }
            };
            Placement {
                rank,
                world,
                local_rank: num("SLURM_LOCALID")?.unwrap_or(0),
                master_addr: addr,
                master_port: port,
            }
        } else {
            return Ok(None);
        };
        if p.world == 0 || p.rank >= p.world {
            bail!(
                "rank {} is not below the world size {} (check RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS)",
                p.rank,
                p.world
            );
        }
        Ok(Some(p))
    }
}

/// The first host of a SLURM node list: `gpu[03-05,07],cpu1` → `gpu03`.
pub fn first_host(list: &str) -> anyhow::Result<String> {
    let list = list.trim();
    let first_end = {
        let mut depth = 0;
        let mut end = list.len();
        for (i, ch) in list.char_indices() {
            match ch {
                '[' => depth += 1,
                ']' => depth -= 1,
                ',' if depth == 0 => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        end
    };
    let first = &list[..first_end];
    let host = match first.split_once('[') {
        None => first.to_string(),
        Some((prefix, rest)) => {
            let inner = rest
                .strip_suffix(']')
                .with_context(|| format!("unbalanced brackets in node list '{list}'"))?;
            let item = inner.split(',').next().unwrap_or_default();
            let lo = item.split('-').next().unwrap_or_default();
            format!("{prefix}{lo}")
        }
    };
    if host.is_empty() {
        bail!("empty SLURM node list '{list}'");
    }
    Ok(host)
}

/// Upstream's `--world_size`, `--local_rank` and `--dist_url`, taken as torchrun's scripts take
/// them: `--dist_url env://` (upstream's default) is what mae-train does anyway; `--local_rank`
/// (passed by the legacy `torch.distributed.launch`) is this process's local rank when the
/// environment gives none; a value that contradicts the environment, or one that asks for
/// something mae-train does not do, is refused with what to use instead.
pub fn upstream_flags(
    args: &DistArgs,
    mut placement: Option<Placement>,
    env_has_local_rank: bool,
) -> anyhow::Result<Option<Placement>> {
    const LAUNCHERS: &str = "start the processes with `mae-train launch --nproc-per-node N`, \
        torchrun or SLURM, which set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT";
    if let Some(url) = args.dist_url.as_deref() {
        if url != "env://" {
            bail!(
                "--dist-url {url}: mae-train reads the rendezvous from the environment (env://); \
                 {LAUNCHERS}"
            );
        }
    }
    let world = placement.as_ref().map_or(1, |p| p.world);
    if let Some(n) = args.world_size {
        if n != world {
            bail!(
                "--world-size {n}, but the environment describes {world} process(es); \
                 {LAUNCHERS}"
            );
        }
    }
    if let Some(lr) = args.local_rank {
        match placement.as_mut() {
            None if lr == 0 => {}
            None => bail!("--local-rank {lr} without a distributed environment; {LAUNCHERS}"),
            Some(p) if !env_has_local_rank => p.local_rank = lr,
            Some(p) if p.local_rank != lr => bail!(
                "--local-rank {lr}, but the environment says LOCAL_RANK={}; leave the flag out",
                p.local_rank
            ),
            Some(_) => {}
        }
    }
    Ok(placement)
}

/// One process of a (possibly single-process) data-parallel run.
#[derive(Debug)]
pub struct Dist {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    group: Option<ffi::Group>,
}

impl Dist {
    /// A run of one process.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world: 1,
            local_rank: 0,
            group: None,
        }
    }

    /// Joins the run described by the environment (or runs alone when it describes none) and
    /// returns the device this rank computes on: `cuda:LOCAL_RANK` when `device` is CUDA. A
    /// described run of one process still joins a process group, as torchrun's would.
    pub fn init(args: &DistArgs, device: Device) -> anyhow::Result<(Self, Device)> {
        let placement = Placement::from_env(|k| std::env::var(k).ok())?;
        let placement = upstream_flags(args, placement, std::env::var_os("LOCAL_RANK").is_some())?;
        let Some(p) = placement else {
            return Ok((Self::single(), device));
        };
        let device = match device {
            Device::Cuda(_) => {
                let n = tch::Cuda::device_count() as usize;
                if p.local_rank >= n {
                    bail!(
                        "local rank {} needs GPU {}, but this node has {n} GPU(s)",
                        p.local_rank,
                        p.local_rank
                    );
                }
                Device::Cuda(p.local_rank)
            }
            d => d,
        };
        if p.local_rank > 0 || p.rank > 0 {
            NOT_MAIN.store(p.rank != 0, Ordering::Relaxed);
        }
        let backend = match (&args.dist_backend, device) {
            (Some(b), _) => b.clone(),
            (None, Device::Cuda(_)) => "nccl".to_string(),
            (None, _) => "gloo".to_string(),
        };
        if backend == "nccl" && !ffi::nccl_available() {
            bail!("--dist-backend nccl: this mae-train was built without NCCL (use gloo)");
        }
        if backend == "nccl" && !device.is_cuda() {
            bail!("--dist-backend nccl needs --device cuda; use gloo on the CPU");
        }
        let timeout = Duration::from_secs(args.dist_timeout.max(1));
        let iface = std::env::var("GLOO_SOCKET_IFNAME").unwrap_or_default();
        let group = ffi::Group::init(
            &backend,
            &p.master_addr,
            p.master_port,
            p.rank,
            p.world,
            timeout,
            &iface,
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "rank {} of {}: cannot join the process group at {}:{} ({backend}): {e}",
                p.rank,
                p.world,
                p.master_addr,
                p.master_port
            )
        })?;
        if p.rank == 0 {
            println!(
                "distributed: {} processes, backend {backend}, rendezvous {}:{}",
                p.world, p.master_addr, p.master_port
            );
        }
        Ok((
            Self {
                rank: p.rank,
                world: p.world,
                local_rank: p.local_rank,
                group: Some(group),
            },
            device,
        ))
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Whether this process is part of a process group (even one of world size 1).
    pub fn is_distributed(&self) -> bool {
        self.group.is_some()
    }

    fn fail(&self, what: &str, e: String) -> anyhow::Error {
        anyhow::anyhow!(
            "rank {} of {}: {what} failed (another rank may have stopped or timed out): {e}",
            self.rank,
            self.world
        )
    }

    /// Copies rank 0's values of `tensors` to every rank, in flat buckets.
    pub fn broadcast(&self, tensors: &[Tensor]) -> anyhow::Result<()> {
        let Some(g) = &self.group else { return Ok(()) };
        let ts: Vec<Tensor> = tensors.iter().map(|t| t.detach()).collect();
        tch::no_grad(|| {
            in_buckets(&ts, |flat| {
                g.broadcast(std::slice::from_mut(flat), 0)
                    .map_err(|e| self.fail("parameter broadcast", e))
            })
        })
    }

    /// Every variable of `vs` (parameters and buffers) from rank 0, in name order.
    pub fn broadcast_vars(&self, vs: &tch::nn::VarStore) -> anyhow::Result<()> {
        if self.group.is_none() {
            return Ok(());
        }
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let ts: Vec<Tensor> = named.into_iter().map(|(_, t)| t).collect();
        tch::no_grad(|| self.broadcast(&ts))
    }

    /// Averages the gradients of `params` over the ranks, in flat buckets.
    pub fn average_gradients(&self, params: &[Tensor]) -> anyhow::Result<()> {
        let Some(g) = &self.group else { return Ok(()) };
        let grads: Vec<Tensor> = params
            .iter()
            .map(|p| p.grad())
            .filter(|g| g.defined())
            .collect();
        let world = self.world as f64;
        tch::no_grad(|| {
            in_buckets(&grads, |flat| {
                g.allreduce_sum(std::slice::from_mut(flat))
                    .map_err(|e| self.fail("gradient all-reduce", e))?;
                *flat = &*flat / world;
                Ok(())
            })
        })
    }

    /// Sums `values` over the ranks (in f64).
    pub fn sum(&self, values: &[f64]) -> anyhow::Result<Vec<f64>> {
        let Some(g) = &self.group else {
            return Ok(values.to_vec());
        };
        let mut t = [Tensor::from_slice(values)];
        g.allreduce_sum(&mut t)
            .map_err(|e| self.fail("all-reduce", e))?;
        Ok(Vec::<f64>::try_from(&t[0])?)
    }

    /// Every rank's `t` (same shape and kind on all ranks, on this rank's device), by rank.
    pub fn all_gather(&self, t: &Tensor) -> anyhow::Result<Vec<Tensor>> {
        let Some(g) = &self.group else {
            return Ok(vec![t.shallow_clone()]);
        };
        let mut input = t.contiguous();
        let mut outs: Vec<Tensor> = (0..self.world).map(|_| input.empty_like()).collect();
        g.allgather(&mut input, &mut outs)
            .map_err(|e| self.fail("all-gather", e))?;
        Ok(outs)
    }

    /// Fails on every rank when `text` (a model configuration, say) is not the same on all.
    pub fn check_same(&self, what: &str, text: &str) -> anyhow::Result<()> {
        if self.group.is_none() {
            return Ok(());
        }
        let h = fnv1a(text.as_bytes()) as i64;
        let all = self.all_gather(&Tensor::from_slice(&[h]))?;
        for (r, t) in all.iter().enumerate() {
            if t.int64_value(&[0]) != h {
                bail!(
                    "rank {} of {}: the {what} differs between ranks (rank {r} has another); every rank must be started with the same arguments",
                    self.rank,
                    self.world
                );
            }
        }
        Ok(())
    }

    /// Waits for every rank.
    pub fn barrier(&self) -> anyhow::Result<()> {
        match &self.group {
            Some(g) => g.barrier().map_err(|e| self.fail("barrier", e)),
            None => Ok(()),
        }
    }

    /// DistributedSampler's share of `order` for this rank: padded (by repeating from the
    /// start) to a multiple of the world size, then every `world`-th item from `rank`.
    pub fn shard(&self, order: &[usize]) -> Vec<usize> {
        shard(order, self.rank, self.world)
    }
}

/// See [`Dist::shard`].
pub fn shard(order: &[usize], rank: usize, world: usize) -> Vec<usize> {
    if world <= 1 || order.is_empty() {
        return order.to_vec();
    }
    let total = order.len().div_ceil(world) * world;
    (rank..total)
        .step_by(world)
        .map(|i| order[i % order.len()])
        .collect()
}

fn bytes_of(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// Runs `op` on `tensors` concatenated into flat buckets (one kind each, at most
/// [`BUCKET_BYTES`] unless one tensor is larger) and copies each bucket's result back.
fn in_buckets(
    tensors: &[Tensor],
    mut op: impl FnMut(&mut Tensor) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut start = 0;
    while start < tensors.len() {
        let kind = tensors[start].kind();
        let (mut end, mut bytes) = (start, 0);
        while end < tensors.len()
            && tensors[end].kind() == kind
            && (end == start || bytes + bytes_of(&tensors[end]) <= BUCKET_BYTES)
        {
            bytes += bytes_of(&tensors[end]);
            end += 1;
        }
        let bucket = &tensors[start..end];
        let parts: Vec<Tensor> = bucket.iter().map(|t| t.reshape([-1])).collect();
        let mut flat = Tensor::cat(&parts, 0);
        op(&mut flat)?;
        let mut off = 0;
        for t in bucket {
            let n = t.numel() as i64;
            let mut t = t.shallow_clone();
            t.copy_(&flat.narrow(0, off, n).view_as(&t));
            off += n;
        }
        start = end;
    }
    Ok(())
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn slurm_node_lists() {
        assert_eq!(first_host("gpu[03-05,07],cpu1").unwrap(), "gpu03");
        assert_eq!(first_host("node7").unwrap(), "node7");
        assert_eq!(first_host("a1,b2").unwrap(), "a1");
        assert_eq!(first_host("n[10,12]").unwrap(), "n10");
        assert!(first_host("n[1-2").is_err());
    }

    #[test]
    fn placement_from_torchrun_and_slurm() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(Placement::from_env(env(&[])).unwrap(), None);
        let p = Placement::from_env(env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.2"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((p.rank, p.world, p.local_rank), (3, 8, 1));
        assert_eq!((p.master_addr.as_str(), p.master_port), ("10.0.0.2", 1234));
        let p = Placement::from_env(env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "5"),
            ("SLURM_JOB_NODELIST", "gpu[01-02]"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((p.rank, p.world, p.local_rank), (5, 16, 5));
        assert_eq!((p.master_addr.as_str(), p.master_port), ("gpu01", 29500));
        let e = Placement::from_env(env(&[("RANK", "2"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(e.to_string().contains("rank 2"), "{e}");
        let e = Placement::from_env(env(&[("RANK", "x"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(e.to_string().contains("RANK=x"), "{e}");
    }

    #[test]
    fn shards_pad_and_interleave() {
        let order: Vec<usize> = (10..15).collect();
        assert_eq!(shard(&order, 0, 2), vec![10, 12, 14]);
        assert_eq!(shard(&order, 1, 2), vec![11, 13, 10]);
        assert_eq!(shard(&order, 0, 1), order);
        let mut all: Vec<usize> = (0..3).flat_map(|r| shard(&order, r, 3)).collect();
        all.sort();
        assert_eq!(all, vec![10, 10, 11, 12, 13, 14]);
    }

    #[test]
    fn upstream_distributed_flags_act_or_are_refused() {
        let args = |ws: Option<usize>, lr: Option<usize>, url: Option<&str>| DistArgs {
            dist_backend: None,
            dist_timeout: 60,
            dist_eval: false,
            world_size: ws,
            local_rank: lr,
            dist_url: url.map(str::to_string),
        };
        let two = Some(Placement {
            rank: 1,
            world: 2,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
        });
        // Upstream's defaults pass alone and with a distributed environment.
        assert!(
            upstream_flags(&args(Some(1), None, Some("env://")), None, false)
                .unwrap()
                .is_none()
        );
        let p = upstream_flags(&args(Some(2), None, Some("env://")), two.clone(), true).unwrap();
        assert_eq!(p, two);
        // The legacy launcher's --local_rank sets the local rank when LOCAL_RANK is absent.
        let p = upstream_flags(&args(None, Some(1), None), two.clone(), false).unwrap();
        assert_eq!(p.unwrap().local_rank, 1);
        // Contradictions and what mae-train does not do are refused, saying what to use.
        for (a, pl, env) in [
            (args(Some(4), None, None), two.clone(), true),
            (args(Some(2), None, None), None, false),
            (args(None, Some(1), None), two.clone(), true),
            (args(None, Some(3), None), None, false),
            (args(None, None, Some("tcp://10.0.0.1:23456")), None, false),
        ] {
            let e = upstream_flags(&a, pl, env).unwrap_err().to_string();
            assert!(
                e.contains("mae-train launch") || e.contains("leave the flag out"),
                "{e}"
            );
        }
    }
}
