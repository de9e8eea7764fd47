//! Shared helpers for the integration tests: run the built `cpi` binary the way
//! the director does (cleared environment, one request on stdin), check every
//! response against the director's rules, and look at what libvirt holds;
//! import the test stemcell through the CPI and read guests' serial consoles.
#![allow(dead_code)]

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const DIRECTOR_UUID: &str = "c9d2b1e4-6a3f-4e7b-9f10-3b2a5c8d7e61";

pub struct Testbed {
    pub root: PathBuf,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub uri: String,
}

impl Testbed {
    pub fn config_json(&self) -> Value {
        serde_json::from_slice(&std::fs::read(&self.config).unwrap()).unwrap()
    }

    /// A copy of the test-bed config with `patch` deep-merged in, in a temp file.
    pub fn config_with(&self, name: &str, patch: Value) -> PathBuf {
        let mut cfg = self.config_json();
        merge(&mut cfg, &patch);
        let path = scratch_dir(name).join("cpi.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        path
    }

    pub fn stemcell_dir(&self, kind: &str) -> PathBuf {
        self.dir.join("stemcells").join(kind)
    }

    /// `virsh` against the test bed over TLS, as the CPI sees it.
    pub fn virsh(&self, args: &[&str]) -> std::process::Output {
        Command::new("virsh")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .output()
            .expect("running virsh")
    }

    /// `virsh` that must succeed; returns stdout.
    pub fn virsh_ok(&self, args: &[&str]) -> String {
        let restarts = libvirtd_restarts();
        let mut out = self.virsh(args);
        if !out.status.success() && (recover_libvirtd() || libvirtd_restarts() != restarts) {
            out = self.virsh(args);
        }
        assert!(
            out.status.success(),
            "virsh {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn pool_name(&self) -> String {
        self.config_json()["pool"]["name"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Makes sure the test bed's pool exists, the way an operator's first
    /// CPI call makes it (`pool.create`): on a fresh machine nothing has
    /// touched the pool before the first test that needs it.
    pub fn pool_in_use(&self) {
        ok(&self.config, "has_disk", json!(["disk-000000000000000"]));
    }

    /// Names of the volumes in the test bed's pool.
    pub fn volumes(&self) -> Vec<String> {
        let pool = self.pool_name();
        let _ = self.virsh(&["pool-refresh", &pool]);
        vol_list_names(&self.virsh(&["vol-list", &pool, "--details"]))
    }
}

fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// A pool only this test uses; destroyed, undefined and removed on drop.
pub struct PrivatePool {
    pub name: String,
    pub path: PathBuf,
    pub config: PathBuf,
}

impl PrivatePool {
    pub fn new(tag: &str) -> PrivatePool {
        let tb = testbed();
        let name = format!("sctest-{tag}-{}", uuid_like());
        let path = scratch_dir(&format!("pool-{tag}")).join("pool");
        let config = tb.config_with(
            &format!("cfg-{tag}"),
            json!({"pool": {"name": name, "path": path, "create": true}}),
        );
        PrivatePool { name, path, config }
    }

    pub fn volumes(&self) -> Vec<String> {
        let tb = testbed();
        let _ = tb.virsh(&["pool-refresh", &self.name]);
        // Empty while the pool is not created yet.
        vol_list_names(&tb.virsh(&["vol-list", &self.name]))
    }
}

impl Drop for PrivatePool {
    fn drop(&mut self) {
        let tb = testbed();
        for pool in [format!("{}-staging", self.name), self.name.clone()] {
            let _ = tb.virsh(&["pool-destroy", &pool]);
            let _ = tb.virsh(&["pool-undefine", &pool]);
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Brings the test bed up once per test binary (`ci/testbed up` is idempotent
/// and fast when it is already up) and builds the test stemcells. Only for
/// the real tier (Cargo.toml): a test of the hermetic tier that reaches here
/// fails instead of installing packages and starting daemons.
pub fn testbed() -> &'static Testbed {
    static TB: OnceLock<Testbed> = OnceLock::new();
    TB.get_or_init(|| {
        if !cfg!(feature = "real-host") {
            panic!("testbed() needs the real tier: run with --features real-host (see Cargo.toml)");
        }
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        for script in ["ci/testbed", "ci/build-test-stemcells"] {
            let mut cmd = Command::new(root.join(script));
            if script == "ci/testbed" {
                cmd.arg("up");
            }
            let out = cmd
                .output()
                .unwrap_or_else(|e| panic!("running {script}: {e}"));
            assert!(
                out.status.success(),
                "{script} failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let dir = std::fs::canonicalize(root.join("target/testbed")).unwrap();
        let config = dir.join("cpi.json");
        let cfg: Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
        let uri = cfg["libvirt"]["uri"].as_str().unwrap().to_string();
        Testbed {
            root,
            dir,
            config,
            uri,
        }
    })
}

/// A fresh scratch directory under target/ for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/test-scratch")
        .join(format!("{name}-{}", uuid_like()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}{:x}", n, std::process::id())
}

/// Starts the binary exactly as the director does (no argv but the config
/// path, only PATH, HOME and TMPDIR in the environment), writes the request
/// to its stdin and closes it. stdout and stderr are pipes.
pub fn spawn_cpi(config: Option<&Path>, request: &[u8]) -> std::process::Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cpi"));
    if let Some(config) = config {
        cmd.arg(config);
    }
    let mut child = cmd
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env(
            "HOME",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
        )
        .env("TMPDIR", std::env::temp_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the cpi binary");
    child.stdin.take().unwrap().write_all(request).unwrap();
    child
}

/// Names in `virsh vol-list` output (empty when virsh failed), but the
/// directory of the pool's staging pool (src/libvirt/staging.rs), which a
/// `dir` pool lists as a volume.
pub fn vol_list_names(out: &std::process::Output) -> Vec<String> {
    if !out.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|n| n != ".staging")
        .collect()
}

/// Defined domains named `vm-*` whose persistent XML contains `text`.
pub fn vm_domains_mentioning(tb: &Testbed, text: &str) -> Vec<String> {
    tb.virsh_ok(&["list", "--all", "--name"])
        .lines()
        .filter(|name| name.starts_with("vm-"))
        .filter(|name| {
            let xml = tb.virsh(&["dumpxml", name, "--inactive"]);
            String::from_utf8_lossy(&xml.stdout).contains(text)
        })
        .map(str::to_string)
        .collect()
}

/// No CPI call of the tests takes this long; one that does is killed and
/// fails its test (a hung libvirtd must not hang the whole run).
pub const CPI_CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// `wait_with_output`, but the child is killed (and the test fails) when it
/// runs longer than `timeout`.
pub fn wait_with_timeout(
    mut child: std::process::Child,
    timeout: Duration,
) -> std::process::Output {
    use std::io::Read;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "a CPI call ran longer than {timeout:?} and was killed; stderr:\n{}",
                String::from_utf8_lossy(&err.join().unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

pub struct CpiRun {
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub response: Value,
}

/// Runs the binary exactly as the director does: no argv but the config path,
/// only PATH, HOME and TMPDIR in the environment, the request on stdin, then
/// EOF. Asserts exit status 0 and a response the director accepts.
pub fn run_cpi_raw(config: Option<&Path>, stdin: &[u8]) -> CpiRun {
    let restarts = libvirtd_restarts();
    let run = run_cpi_once(config, stdin);
    if cfg!(feature = "real-host")
        && lost_libvirtd(&run.response)
        && (recover_libvirtd() || libvirtd_restarts() != restarts)
    {
        // What the director does with a retryable error, once libvirtd is back.
        eprintln!("repeating the call after the test bed's libvirtd was restarted");
        return run_cpi_once(config, stdin);
    }
    run
}

/// A retryable error saying the connection to libvirtd was lost or never made.
fn lost_libvirtd(response: &Value) -> bool {
    let error = &response["error"];
    let message = error["message"].as_str().unwrap_or("");
    error["ok_to_retry"] == json!(true)
        && [
            "connecting to libvirt",
            "Cannot recv data",
            "End of file while reading",
            "no answer within",
            "keepalive",
            "Broken pipe",
            "Connection reset",
        ]
        .iter()
        .any(|m| message.contains(m))
}

static LIBVIRTD_RESTARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static LIBVIRTD_RECOVERY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How often this test process restarted the test bed's libvirtd.
pub fn libvirtd_restarts() -> usize {
    LIBVIRTD_RESTARTS.load(std::sync::atomic::Ordering::SeqCst)
}

/// libvirt 11.3's libvirtd can deadlock for good when a client dies at the
/// wrong moment: seen here after a create_vm was killed 84 ms in, its main
/// loop blocked in virNetServerClientClose on a lock no thread held, and every
/// client hung. The tests kill CPI processes hundreds of times, so they do
/// what docs/operator-guide.md tells an operator: when libvirtd no longer
/// answers, restart it (running VMs carry on). True when it was restarted.
pub fn recover_libvirtd() -> bool {
    let _one_at_a_time = LIBVIRTD_RECOVERY.lock().unwrap_or_else(|e| e.into_inner());
    let tb = testbed();
    let probe = Command::new("virsh")
        .args(["-c", &tb.uri, "version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("running virsh");
    if wait_for_exit(probe, Duration::from_secs(20)).is_some_and(|s| s.success()) {
        return false;
    }
    let pid_file = tb.dir.join("libvirtd.pid");
    let pid = std::fs::read_to_string(&pid_file).unwrap_or_default();
    let pid = pid.trim();
    eprintln!("the test bed's libvirtd (pid {pid}) does not answer: restarting it");
    if !pid.is_empty() {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
        let gone = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists()
            && gone.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let out = Command::new(tb.root.join("ci/testbed"))
        .arg("up")
        .output()
        .expect("running ci/testbed up");
    assert!(
        out.status.success(),
        "restarting libvirtd: ci/testbed up failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    LIBVIRTD_RESTARTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    true
}

/// The exit status of `child` within `timeout`; None (and the child killed) after it.
fn wait_for_exit(
    mut child: std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run_cpi_once(config: Option<&Path>, stdin: &[u8]) -> CpiRun {
    let child = spawn_cpi(config, stdin);
    let out = wait_with_timeout(child, CPI_CALL_TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "cpi must exit 0; stderr:\n{stderr}"
    );
    let response = assert_director_response(&out.stdout);
    CpiRun {
        stdout: out.stdout,
        stderr,
        response,
    }
}

pub const KNOWN_ERROR_TYPES: &[&str] = &[
    "Bosh::Clouds::CpiError",
    "Bosh::Clouds::NotSupported",
    "Bosh::Clouds::NotImplemented",
    "Bosh::Clouds::CloudError",
    "Bosh::Clouds::VMNotFound",
    "Bosh::Clouds::NetworkNotFound",
    "Bosh::Clouds::NoDiskSpace",
    "Bosh::Clouds::DiskNotAttached",
    "Bosh::Clouds::DiskNotFound",
    "Bosh::Clouds::VMCreationFailed",
];

/// The director's response schema (external_cpi.rb RESPONSE_SCHEMA and
/// KNOWN_RPC_ERRORS): stdout is exactly one JSON object with `result`,
/// `error` (null or {type known, message string, ok_to_retry bool}) and `log`
/// (a string); nothing else on stdout.
pub fn assert_director_response(stdout: &[u8]) -> Value {
    let text = std::str::from_utf8(stdout).expect("stdout must be UTF-8");
    let value: Value = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("stdout must be exactly one JSON document ({e}): {text:?}"));
    let obj = value
        .as_object()
        .unwrap_or_else(|| panic!("response must be an object: {text}"));
    for key in ["result", "error", "log"] {
        assert!(obj.contains_key(key), "response lacks '{key}': {text}");
    }
    assert!(obj["log"].is_string(), "log must be a string: {text}");
    match &obj["error"] {
        Value::Null => {}
        Value::Object(e) => {
            let t = e
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("error.type: {text}"));
            assert!(
                KNOWN_ERROR_TYPES.contains(&t),
                "unknown error type {t}: {text}"
            );
            assert!(
                e.get("message").is_some_and(Value::is_string),
                "error.message: {text}"
            );
            assert!(
                e.get("ok_to_retry").is_some_and(Value::is_boolean),
                "error.ok_to_retry: {text}"
            );
            assert!(
                obj["result"].is_null(),
                "result must be null with an error: {text}"
            );
        }
        other => panic!("error must be null or an object, got {other}: {text}"),
    }
    value
}

/// A request as the director sends it (v2, with a request id).
pub fn director_request(method: &str, arguments: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "method": method,
        "arguments": arguments,
        "context": {"director_uuid": DIRECTOR_UUID, "request_id": "cpi-123456", "vm": {"stemcell": {"api_version": 3}}},
        "api_version": 2
    }))
    .unwrap()
}

/// Calls a method; returns the whole response.
pub fn call(config: &Path, method: &str, arguments: Value) -> Value {
    run_cpi_raw(Some(config), &director_request(method, arguments)).response
}

/// Calls a method that must succeed; returns its result.
pub fn ok(config: &Path, method: &str, arguments: Value) -> Value {
    let r = call(config, method, arguments.clone());
    assert!(
        r["error"].is_null(),
        "{method} {arguments} failed: {}",
        r["error"]
    );
    r["result"].clone()
}

/// Calls a method that must fail; returns (type without prefix, message).
pub fn err(config: &Path, method: &str, arguments: Value) -> (String, String) {
    let r = call(config, method, arguments.clone());
    assert!(
        !r["error"].is_null(),
        "{method} {arguments} should have failed: {r}"
    );
    let t = r["error"]["type"]
        .as_str()
        .unwrap()
        .trim_start_matches("Bosh::Clouds::")
        .to_string();
    (t, r["error"]["message"].as_str().unwrap().to_string())
}

// ---- guests: stemcells imported through the CPI, their serial consoles ----

/// A test stemcell imported through create_stemcell; deleted on drop.
pub struct Stemcell {
    pub cid: String,
}

impl Stemcell {
    pub fn import(tb: &Testbed) -> Stemcell {
        let dir = tb.stemcell_dir("qcow2");
        let cid = ok(
            &tb.config,
            "create_stemcell",
            json!([dir.join("image"), {"name": "bosh-libvirt-test", "version": "1.0", "disk": 64, "disk_format": "qcow2"}]),
        );
        Stemcell {
            cid: cid.as_str().unwrap().to_string(),
        }
    }
}

impl Drop for Stemcell {
    fn drop(&mut self) {
        let _ = call(&testbed().config, "delete_stemcell", json!([self.cid]));
    }
}

/// The serial console log the CPI gives a VM: `<console_log_dir>/<vm>.console.log`.
pub fn console_path(tb: &Testbed, vm: &str) -> PathBuf {
    PathBuf::from(tb.config_json()["console_log_dir"].as_str().unwrap())
        .join(format!("{vm}.console.log"))
}

/// Console lines starting with `CPITEST ` (prefix removed).
pub fn console_lines(path: &Path) -> Vec<String> {
    // Lossy: early boot output may hold bytes that are not UTF-8.
    let bytes = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|l| {
            l.trim_matches(|c| c == '\r' || c == ' ')
                .strip_prefix("CPITEST ")
                .map(str::to_string)
        })
        .collect()
}

/// Waits until the `CPITEST` lines of a console satisfy `done`; returns them.
pub fn wait_console(
    path: &Path,
    what: &str,
    timeout: Duration,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let start = Instant::now();
    loop {
        let lines = console_lines(path);
        if done(&lines) {
            return lines;
        }
        assert!(
            start.elapsed() < timeout,
            "waited {timeout:?} for {what} on {}; console so far:\n{}",
            path.display(),
            lines.join("\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

// ---- the shared NAT network, seeded faults, a private libvirtd ----

pub fn net_name(tb: &Testbed) -> String {
    tb.config_json()["network"]["name"]
        .as_str()
        .unwrap()
        .to_string()
}

/// (mac, name, ip) of every DHCP host entry of a libvirt network.
pub fn dhcp_hosts(tb: &Testbed, network: &str) -> Vec<(String, String, String)> {
    let xml = tb.virsh_ok(&["net-dumpxml", network]);
    xml.lines()
        .filter(|l| l.trim_start().starts_with("<host "))
        .map(|l| {
            let attr = |k: &str| {
                l.split(&format!("{k}='"))
                    .nth(1)
                    .and_then(|r| r.split('\'').next())
                    .unwrap_or("")
                    .to_lowercase()
            };
            (attr("mac"), attr("name"), attr("ip"))
        })
        .collect()
}

/// A manual IP in 10.253.77.[lo, hi) not reserved right now.
pub fn free_ip(tb: &Testbed, lo: u8, hi: u8, avoid: &HashSet<String>) -> String {
    let taken: HashSet<String> = dhcp_hosts(tb, &net_name(tb))
        .into_iter()
        .map(|h| h.2)
        .collect();
    loop {
        let n = lo + (uuid::Uuid::new_v4().as_bytes()[0] % (hi - lo));
        let ip = format!("10.253.77.{n}");
        if !taken.contains(&ip) && !avoid.contains(&ip) {
            return ip;
        }
    }
}

pub fn manual(ip: &str) -> Value {
    json!({"type": "manual", "ip": ip, "netmask": "255.255.255.0", "gateway": "10.253.77.1",
           "dns": ["10.253.77.1"], "default": ["dns", "gateway"], "cloud_properties": {}})
}

/// A seeded generator for fault tests: the seed comes from FAULT_SEED (a
/// fixed default otherwise) and is printed, so a failing run can be replayed.
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Lcg {
        Lcg(seed)
    }

    pub fn from_env() -> Lcg {
        let seed = std::env::var("FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_c0de);
        eprintln!("FAULT_SEED={seed}");
        Lcg(seed)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// A libvirtd of the test's own: a copy of the binary under another name
/// (so `ci/testbed` never takes it for a system libvirtd), in private mount
/// and network namespaces (its /run/libvirt, /var/lib/libvirt, /etc/libvirt
/// and /var/cache/libvirt are its own directories; the networks the CPI
/// makes there, bridges and dnsmasq included, are invisible to the host),
/// answering on a unix socket the CPI reaches from outside. It runs domains
/// (QEMU writes console files itself: no virtlogd). Its domains and networks
/// are destroyed and it is killed on drop.
pub struct PrivateLibvirtd {
    pub dir: PathBuf,
    daemon: Option<Child>,
}

impl PrivateLibvirtd {
    pub fn start(tag: &str) -> PrivateLibvirtd {
        testbed(); // packages installed, as for every test
        let dir = scratch_dir(&format!("libvirtd-{tag}"));
        for d in ["sock", "run", "lib", "etc", "cache", "pool"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::copy("/usr/sbin/libvirtd", dir.join("lvd-fault")).unwrap();
        std::fs::write(
            dir.join("libvirtd.conf"),
            format!(
                "unix_sock_dir = \"{d}/sock\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n\
                 log_outputs = \"3:file:{d}/libvirtd.log\"\n",
                d = dir.display()
            ),
        )
        .unwrap();
        // QEMU writes its console file itself: the test bed's virtlogd socket
        // is not in this namespace.
        std::fs::write(dir.join("etc/qemu.conf"), "stdio_handler = \"file\"\n").unwrap();
        let mut me = PrivateLibvirtd { dir, daemon: None };
        me.run();
        me
    }

    /// (Re)starts the daemon on the same directories and waits for it.
    pub fn run(&mut self) {
        let d = self.dir.display();
        let script = format!(
            "mount --bind {d}/run /run/libvirt && mount --bind {d}/lib /var/lib/libvirt && \
             mount --bind {d}/etc /etc/libvirt && mount --bind {d}/cache /var/cache/libvirt && \
             exec {d}/lvd-fault -f {d}/libvirtd.conf -p {d}/pid"
        );
        let _ = std::fs::remove_file(self.dir.join("sock/libvirt-sock"));
        let child = Command::new("unshare")
            .args(["-m", "-n", "--propagation", "private", "sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("virsh")
                .args(["-c", &self.uri(), "version"])
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the private libvirtd did not start"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn uri(&self) -> String {
        format!(
            "qemu+unix:///system?socket={}/sock/libvirt-sock",
            self.dir.display()
        )
    }

    pub fn pid(&self) -> String {
        self.daemon.as_ref().unwrap().id().to_string()
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([sig, &self.pid()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    pub fn kill(&mut self) {
        self.signal("-KILL");
        let _ = self.daemon.take().unwrap().wait();
    }

    /// A CPI config for this libvirtd, with a pool of its own.
    pub fn config(&self) -> PathBuf {
        testbed().config_with(
            "private-libvirtd",
            json!({"libvirt": {"uri": self.uri()},
                   "pool": {"name": "fault", "path": self.dir.join("pool"), "create": true}}),
        )
    }

    pub fn volumes(&self) -> Vec<String> {
        vol_list_names(
            &Command::new("virsh")
                .args(["-c", &self.uri(), "vol-list", "fault"])
                .output()
                .unwrap(),
        )
    }
}

impl Drop for PrivateLibvirtd {
    fn drop(&mut self) {
        // Its QEMU processes would outlive it.
        if self.daemon.is_some() {
            let virsh = |args: &[&str]| {
                Command::new("timeout")
                    .args(["30", "virsh", "-c", &self.uri()])
                    .args(args)
                    .output()
            };
            if let Ok(out) = virsh(&["list", "--name"]) {
                for name in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = virsh(&["destroy", name]);
                }
            }
            // And its networks' dnsmasq processes.
            if let Ok(out) = virsh(&["net-list", "--name"]) {
                for name in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = virsh(&["net-destroy", name]);
                }
            }
        }
        if let Some(mut c) = self.daemon.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
