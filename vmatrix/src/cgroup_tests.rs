//! Tests of `cgroup.rs`: finding the hierarchy from mount tables of both kinds, the files
//! written for each limit in v1 and v2 (on a directory tree shaped like the kernel's), usage
//! read back. The real kernel groups are exercised in `tests/limits.rs`.

use super::*;
use failover::limits::Limits;

/// This project's test machine: v1 controllers, an empty v2 mount, our memory group nested.
const MOUNTINFO_V1: &str = "\
24 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 24 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct
34 30 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
37 30 0:33 / /sys/fs/cgroup/blkio rw - cgroup cgroup rw,blkio
40 30 0:36 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
";
const OWN_V1: &str = "\
9:name=systemd:/
7:blkio:/
4:memory:/process_api/ef8f
2:cpuacct:/
1:cpu:/
0::/
";

#[test]
fn v1_hierarchy_is_found_under_our_own_groups() {
    let h = find_hierarchy(MOUNTINFO_V1, OWN_V1, Path::new("/")).unwrap();
    assert_eq!(
        h,
        Hierarchy::V1 {
            cpu: "/sys/fs/cgroup/cpu".into(),
            cpuacct: Some("/sys/fs/cgroup/cpuacct".into()),
            memory: "/sys/fs/cgroup/memory/process_api/ef8f".into(),
            blkio: Some("/sys/fs/cgroup/blkio".into()),
        }
    );
    // cpu and cpuacct mounted together (systemd's layout), memory missing: none.
    let together = MOUNTINFO_V1.replace("rw,cpu\n", "rw,cpu,cpuacct\n");
    let own = OWN_V1.replace("1:cpu:/", "1:cpu,cpuacct:/sys.slice");
    let Some(Hierarchy::V1 { cpu, cpuacct, .. }) = find_hierarchy(&together, &own, Path::new("/"))
    else {
        panic!()
    };
    assert_eq!(cpu, PathBuf::from("/sys/fs/cgroup/cpu/sys.slice"));
    assert!(cpuacct.is_some());
    // Seen from another mount namespace: under init's root.
    let Some(Hierarchy::V1 { memory, .. }) =
        find_hierarchy(MOUNTINFO_V1, OWN_V1, Path::new("/proc/1/root"))
    else {
        panic!()
    };
    assert_eq!(
        memory,
        PathBuf::from("/proc/1/root/sys/fs/cgroup/memory/process_api/ef8f")
    );
    let no_memory = MOUNTINFO_V1.replace("rw,memory", "rw,pids");
    assert_eq!(find_hierarchy(&no_memory, OWN_V1, Path::new("/")), None);
    assert_eq!(find_hierarchy("garbage\n - \n", "", Path::new("/")), None);
}

#[test]
fn v2_is_chosen_where_it_offers_cpu_and_memory() {
    let d = tempfile::tempdir().unwrap();
    let mnt = d.path().join("unified");
    fs::create_dir_all(&mnt).unwrap();
    fs::write(
        mnt.join("cgroup.controllers"),
        "cpuset cpu io memory pids\n",
    )
    .unwrap();
    let mi = format!(
        "{MOUNTINFO_V1}41 30 0:37 / {} rw - cgroup2 cgroup2 rw\n",
        mnt.display()
    );
    let own = OWN_V1.replace("0::/", "0::/agents/a1");
    assert_eq!(
        find_hierarchy(&mi, &own, Path::new("/")),
        Some(Hierarchy::V2(mnt.join("agents/a1")))
    );
    // Without the memory controller, v1 serves.
    fs::write(mnt.join("cgroup.controllers"), "cpu io\n").unwrap();
    assert!(matches!(
        find_hierarchy(&mi, &own, Path::new("/")),
        Some(Hierarchy::V1 { .. })
    ));
}

/// A v1 tree of four controller directories, each with the files the kernel would show.
fn v1_tree(root: &Path) -> Hierarchy {
    let h = Hierarchy::V1 {
        cpu: root.join("cpu"),
        cpuacct: Some(root.join("cpuacct")),
        memory: root.join("memory"),
        blkio: Some(root.join("blkio")),
    };
    for d in h.dirs() {
        fs::create_dir_all(d).unwrap();
    }
    fs::write(root.join("cpu/cpu.rt_runtime_us"), "950000").unwrap();
    h
}

#[test]
fn v1_limits_land_in_the_kernels_files_and_usage_reads_back() {
    let d = tempfile::tempdir().unwrap();
    let parent = v1_tree(d.path());
    let rt = RtBudget {
        total_us: 300_000,
        vm_us: 50_000,
    };
    let cg = Cgroups::at(&parent, "vmatrix-h1", rt).unwrap();
    assert_eq!(cg.kind(), "v1");
    let base_rt = d.path().join("cpu/vmatrix-h1/cpu.rt_runtime_us");
    assert_eq!(fs::read_to_string(base_rt).unwrap(), "300000");
    let mut g = cg.group("web.primary").unwrap();
    assert!(cg.share_rt(&[&g]));
    let cpu = d.path().join("cpu/vmatrix-h1/web.primary");
    let mem = d.path().join("memory/vmatrix-h1/web.primary");
    let blk = d.path().join("blkio/vmatrix-h1/web.primary");
    assert_eq!(
        fs::read_to_string(cpu.join("cpu.rt_runtime_us")).unwrap(),
        "50000"
    );
    let l = Limits {
        cpu_millis: 250,
        cpu_weight: 50,
        memory_mib: 200,
        io_read_bps: 0,
        io_write_bps: 1 << 20,
    };
    g.set(&l, Some((254, 0))).unwrap();
    let f = |p: &Path, n: &str| fs::read_to_string(p.join(n)).unwrap();
    assert_eq!(f(&cpu, "cpu.cfs_quota_us"), "25000");
    assert_eq!(f(&cpu, "cpu.cfs_period_us"), "100000");
    assert_eq!(f(&cpu, "cpu.shares"), "512");
    assert_eq!(f(&mem, "memory.limit_in_bytes"), (200u64 << 20).to_string());
    assert_eq!(f(&blk, "blkio.throttle.write_bps_device"), "254:0 1048576");
    assert_eq!(f(&blk, "blkio.throttle.read_bps_device"), "254:0 0");
    g.add(4242).unwrap();
    assert!(g.holds(4242));
    assert_eq!(f(&mem, "cgroup.procs"), "4242");

    // Lifted: the kernel's "no limit" values.
    g.set(&Limits::default(), Some((254, 0))).unwrap();
    assert_eq!(f(&cpu, "cpu.cfs_quota_us"), "-1");
    assert_eq!(f(&mem, "memory.limit_in_bytes"), "-1");
    assert_eq!(f(&cpu, "cpu.shares"), "1024");
    // Disk limits without a block device: a clear error.
    let e = g.set(&l, None).unwrap_err();
    assert!(e.to_string().contains("block device"), "{e}");

    // Usage as the kernel shows it.
    let acct = d.path().join("cpuacct/vmatrix-h1/web.primary");
    fs::write(acct.join("cpuacct.usage"), "1000000000\n").unwrap();
    fs::write(
        cpu.join("cpu.stat"),
        "nr_periods 10\nnr_throttled 3\nthrottled_time 7000000\n",
    )
    .unwrap();
    fs::write(mem.join("memory.usage_in_bytes"), "123456\n").unwrap();
    fs::write(mem.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
    fs::write(
        mem.join("memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
    )
    .unwrap();
    let u = g.usage();
    assert_eq!(
        u,
        Usage {
            cpu_millis: 0,
            throttled_us: 7000,
            mem_bytes: 123456,
            mem_limit_bytes: 0,
            oom_kills: 2,
        }
    );
    fs::write(acct.join("cpuacct.usage"), "1500000000\n").unwrap();
    assert_eq!(g.usage().cpu_millis, 0, "no whole window yet");
    std::thread::sleep(RATE_WINDOW);
    let u = g.usage();
    // 0.5 s of CPU in a little over 1 s: about half a CPU.
    assert!((300..=500).contains(&u.cpu_millis), "{u:?}");

    assert_eq!(cg.children(), vec!["web.primary".to_string()]);
    // (A temp tree's directories hold files, so only the kernel's can be removed; that path
    // runs in tests/limits.rs.)
}

#[test]
fn v2_limits_land_in_the_kernels_files() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("unified");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("cgroup.controllers"), "cpu io memory pids").unwrap();
    let cg = Cgroups::at(
        &Hierarchy::V2(root.clone()),
        "vmatrix-h1",
        RtBudget {
            total_us: 300_000,
            vm_us: 50_000,
        },
    )
    .unwrap();
    assert_eq!(
        fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
        "+cpu +memory +io"
    );
    let mut g = cg.group("web-c0.clone").unwrap();
    let l = Limits {
        cpu_millis: 1500,
        cpu_weight: 0,
        memory_mib: 300,
        io_read_bps: 4096,
        io_write_bps: 0,
    };
    g.set(&l, Some((8, 16))).unwrap();
    let dir = root.join("vmatrix-h1/web-c0.clone");
    let f = |n: &str| fs::read_to_string(dir.join(n)).unwrap();
    assert_eq!(f("cpu.max"), "150000 100000");
    assert_eq!(f("cpu.weight"), "100");
    assert_eq!(f("memory.max"), (300u64 << 20).to_string());
    assert_eq!(f("io.max"), "8:16 rbps=4096 wbps=max");
    fs::write(dir.join("cpu.stat"), "usage_usec 500\nthrottled_usec 42\n").unwrap();
    fs::write(dir.join("memory.current"), "999\n").unwrap();
    fs::write(dir.join("memory.events"), "low 0\noom 1\noom_kill 1\n").unwrap();
    let u = g.usage();
    assert_eq!((u.throttled_us, u.mem_bytes, u.oom_kills), (42, 999, 1));
    assert_eq!(u.mem_limit_bytes, 300 << 20);
}

#[test]
fn names_and_devices() {
    assert_eq!(sanitize("web-c0.clone"), "web-c0.clone");
    assert_eq!(sanitize("../etc"), "_etc");
    assert_eq!(sanitize("a/b c"), "a_b_c");
    assert_eq!(block_device(Path::new("/proc")), None);
    assert_eq!(field("a 1\nb 2\n", "b"), 2);
    assert_eq!(field("a 1\n", "zz"), 0);
}
