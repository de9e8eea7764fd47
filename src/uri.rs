//! libvirt connection URIs, read the way libvirt reads them, so that a check
//! on a URI sees what libvirt will act on: `driver[+transport]://[user@]host
//! [:port]/path?name=value&...#fragment`. libvirt (`virURIParse` in
//! src/util/viruri.c) hands the string to libxml2's `xmlParseURI`, which
//! refuses characters RFC 3986 does not allow and ends the query at the first
//! `#`; `virURIParseParams` then splits the query on `&`, or on `;` only when
//! no `&` is left, names and values percent-decoded; names are compared
//! without case (the remote driver's `STRCASEEQ` in `doRemoteOpen`), and a
//! `no_verify` value read as an integer where anything but 0 turns
//! verification off (`no_verify=2`, `01`, `+1` and `-1` all do).
//!
//! No libvirt here: the front executable checks the config without loading it.

/// How the client reaches libvirtd, which decides what protects the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The local unix socket (`qemu:///system`, `qemu+unix://...`).
    Unix,
    /// TLS with certificates (`qemu+tls://host/...`, and `qemu://host/...`).
    Tls,
    /// ssh, whichever client (`+ssh`, `+libssh2`, `+libssh`).
    Ssh,
    /// Plain TCP: no encryption, SASL at best.
    Tcp,
    /// A command the operator names (`+ext`).
    Ext,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Unix => "unix",
            Transport::Tls => "tls",
            Transport::Ssh => "ssh",
            Transport::Tcp => "tcp",
            Transport::Ext => "ext",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtUri {
    pub transport: Transport,
    /// The transport as written after `+`, lowercased (`ssh`, `libssh`, ...);
    /// empty when the URI names none.
    pub transport_name: String,
    /// Empty for a local URI.
    pub host: String,
    /// The port the URI names, if any.
    pub port: Option<u16>,
    /// Decoded query parameters, in order.
    pub params: Vec<(String, String)>,
}

impl LibvirtUri {
    pub fn parse(uri: &str) -> Result<LibvirtUri, String> {
        check_characters(uri)?;
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| format!("'{uri}' is not a libvirt URI (driver[+transport]://...)"))?;
        let transport_name = scheme.split_once('+').map(|(_, t)| t);
        let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
        let (authority_path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let authority = authority_path.split('/').next().unwrap_or("");
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host = if host_port.starts_with('[') {
            host_port.split_inclusive(']').next().unwrap_or(host_port)
        } else {
            host_port.split(':').next().unwrap_or(host_port)
        };
        let port = host_port[host.len()..]
            .strip_prefix(':')
            .and_then(|p| p.parse().ok());
        let transport_name = transport_name.map(|t| t.to_ascii_lowercase());
        let transport = match transport_name.as_deref() {
            None if host.is_empty() => Transport::Unix,
            None | Some("tls") => Transport::Tls,
            Some("unix") => Transport::Unix,
            Some("ssh" | "libssh2" | "libssh") => Transport::Ssh,
            Some("tcp") => Transport::Tcp,
            Some("ext") => Transport::Ext,
            Some(other) => return Err(format!("unknown libvirt transport '{other}' in '{uri}'")),
        };
        let params = query_params(query);
        Ok(LibvirtUri {
            transport,
            transport_name: transport_name.unwrap_or_default(),
            host: host.to_string(),
            port,
            params,
        })
    }

    /// The last value of parameter `name` (libvirt lets a later one win).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether libvirt would skip verifying the server (TLS certificate or
    /// ssh host key): any `no_verify` whose value is not the integer 0, and
    /// for the libssh/libssh2 clients a `known_hosts_verify` of `auto` (trust
    /// and record an unknown key) or `ignore`.
    pub fn skips_verification(&self) -> bool {
        let no_verify = self
            .params
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("no_verify"))
            .any(|(_, v)| strtol_prefix(v) != 0 || v.trim().is_empty());
        let lax_host_keys = self.transport == Transport::Ssh
            && self
                .param("known_hosts_verify")
                .is_some_and(|v| v != "normal");
        no_verify || lax_host_keys
    }

    /// Whether this is libvirt's `+ssh` transport, which runs the `ssh`
    /// binary: it passes `keyfile` on (`-i`) but ignores `known_hosts`, so the
    /// host key is checked against the user's own `~/.ssh/known_hosts`. Only
    /// `+libssh` and `+libssh2` verify against a `known_hosts=` file.
    pub fn runs_ssh_binary(&self) -> bool {
        self.transport == Transport::Ssh && self.transport_name == "ssh"
    }
}

/// The query's parameters as libvirt's `virURIParseParams` finds them: the
/// next segment ends at the next `&`, or at the next `;` only when no `&`
/// follows (so `a=1;no_verify=1&b=2` is `a` = `1;no_verify=1`, then `b`);
/// the name ends at the segment's first `=`; `=value` is ignored.
fn query_params(query: &str) -> Vec<(String, String)> {
    let mut params = Vec::new();
    let mut rest = query;
    while !rest.is_empty() {
        let end = rest
            .find('&')
            .or_else(|| rest.find(';'))
            .unwrap_or(rest.len());
        let segment = &rest[..end];
        match segment.split_once('=') {
            Some(("", _)) => {}
            Some((name, value)) => params.push((percent_decode(name), percent_decode(value))),
            None if segment.is_empty() => {}
            None => params.push((percent_decode(segment), String::new())),
        }
        rest = rest.get(end + 1..).unwrap_or("");
    }
    params
}

/// What libxml2's URI parser refuses, refused here too, so that a URI this
/// module accepts is one libvirt reads the same way (checked against
/// libvirt 11 with virsh: `Unable to parse URI`): a byte RFC 3986 does not
/// allow (space, `|`, `"`, `<`, `>`, `\\`, `^`, backquote, `{`, `}`, control
/// characters, non-ASCII), a `%` not followed by two hex digits, a second `#`.
fn check_characters(uri: &str) -> Result<(), String> {
    let b = uri.as_bytes();
    let refuse = |why: String| {
        Err(format!(
            "libvirt cannot parse the URI '{}': {why}",
            uri.escape_debug()
        ))
    };
    for (i, &c) in b.iter().enumerate() {
        let allowed = c.is_ascii_alphanumeric() || b"-._~:/?#[]@!$&'()*+,;=%".contains(&c);
        if !allowed {
            return refuse(format!(
                "character {:?} at byte {i} is not allowed in a URI (percent-encode it)",
                char::from(c)
            ));
        }
        if c == b'%'
            && !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
        {
            return refuse(format!("'%' at byte {i} is not followed by two hex digits"));
        }
    }
    if b.iter().filter(|&&c| c == b'#').count() > 1 {
        return refuse("more than one '#'".into());
    }
    // Brackets belong around an IPv6 host and may appear in the fragment;
    // nowhere else (RFC 3986's path and query characters exclude them).
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Ok(()); // not a libvirt URI at all: parse() says so
    };
    if !scheme
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"+-.".contains(&c))
        || !scheme.starts_with(|c: char| c.is_ascii_alphabetic())
    {
        return refuse(format!("'{scheme}' is not a URI scheme"));
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let fragment_start = rest.find('#').unwrap_or(rest.len());
    if let Some(at) = rest[authority_end..fragment_start].find(['[', ']']) {
        return refuse(format!(
            "'{}' at byte {} is only allowed around an IPv6 host",
            &rest[authority_end + at..authority_end + at + 1],
            scheme.len() + 3 + authority_end + at
        ));
    }
    Ok(())
}

/// `%XX` sequences decoded; anything else (a lone `%`, `+`) kept as it is.
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The integer C's `strtol(s, NULL, 10)` reads from the start of `s`
/// (leading blanks and a sign allowed; 0 when there are no digits). Not
/// zero is all that matters here, so overflow just stays non-zero.
fn strtol_prefix(s: &str) -> i64 {
    let t = s.trim_start();
    let (neg, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let mut n: i64 = 0;
    for c in digits.bytes().take_while(u8::is_ascii_digit) {
        n = n.saturating_mul(10).saturating_add(i64::from(c - b'0'));
    }
    if neg {
        -n
    } else {
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skips(uri: &str) -> bool {
        LibvirtUri::parse(uri).unwrap().skips_verification()
    }

    #[test]
    fn every_spelling_of_no_verify_that_libvirt_honours_is_seen() {
        for q in [
            "no_verify=1",
            "NO_VERIFY=1",
            "No_Verify=1",
            "no_verify=2",
            "no_verify=01",
            "no_verify=-1",
            "no_verify=+1",
            "no%5Fverify=1",
            "no%5fverify=1",
            "no_verify=%31",
            "pkipath=/p;no_verify=1",
            "no_verify=0&no_verify=1",
            "no_verify=%20%2B1",
            "no_verify",
        ] {
            assert!(skips(&format!("qemu+tls://h/system?{q}")), "{q}");
        }
        for q in [
            "",
            "no_verify=0",
            "no_verify=00",
            "pkipath=/no_verify=1",
            "xno_verify=1",
        ] {
            assert!(!skips(&format!("qemu+tls://h/system?{q}")), "{q}");
        }
    }

    /// Each case checked with `virsh -c 'qemu+tls://localhost/system?pkipath=...&CASE' uri`
    /// against libvirt 11.3, where a `no_verify=x` libvirt reads fails with
    /// "Failed to parse value of URI component no_verify".
    #[test]
    fn parameters_and_fragments_are_split_as_libvirt_splits_them() {
        let names = |q: &str| -> Vec<String> {
            LibvirtUri::parse(&format!("qemu+tls://h/system?{q}"))
                .unwrap()
                .params
                .into_iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect()
        };
        assert_eq!(names("a=1;no_verify=x"), ["a=1", "no_verify=x"]);
        assert_eq!(
            names("p=/p&x=1;no_verify=x"),
            ["p=/p", "x=1", "no_verify=x"]
        );
        assert_eq!(names("a=1;no_verify=1&b=2"), ["a=1;no_verify=1", "b=2"]);
        assert_eq!(names("=v&&n&m="), ["n=", "m="]);
        assert_eq!(names("p=/p#&no_verify=x"), ["p=/p"]);
        assert!(!skips("qemu+tls://h/system?p=/p#&no_verify=1"));
        assert!(!skips("qemu+tls://h/system#?no_verify=1"));
        assert!(!skips("qemu+tls://h/system?a=1;no_verify=1&b=2"));
        assert!(skips("qemu+tls://h/system?a=1&b=2;no_verify=1"));
        for bad in [
            "qemu+tls://h/system?a=%ZZ&no_verify=1",
            "qemu+tls://h/system?a=b c",
            "qemu+tls://h/system?a=b|c",
            "qemu+tls://h/system?p#frag#x&no_verify=1",
            "qemu+tls://h/system?a=\u{e9}",
            "qemu+tls://h/system?a=%2",
            "qemu+tls://h/system?pkipath=/p[",
            "qemu+tls://h/sys]tem",
            "qe%6Du+tls://h/system",
        ] {
            let e = LibvirtUri::parse(bad).unwrap_err();
            assert!(e.contains("libvirt cannot parse the URI"), "{bad}: {e}");
        }
    }

    #[test]
    fn transports() {
        let t = |u: &str| LibvirtUri::parse(u).unwrap().transport;
        assert_eq!(t("qemu:///system"), Transport::Unix);
        assert_eq!(t("qemu+unix:///system?socket=/s"), Transport::Unix);
        assert_eq!(t("qemu://h/system"), Transport::Tls);
        assert_eq!(t("qemu+TLS://h/system"), Transport::Tls);
        assert_eq!(t("qemu+ssh://u@h:22/system?keyfile=/k"), Transport::Ssh);
        assert_eq!(t("qemu+libssh2://h/system"), Transport::Ssh);
        assert_eq!(t("qemu+tcp://h/system"), Transport::Tcp);
        assert!(LibvirtUri::parse("qemu+carrier-pigeon://h/system").is_err());
        assert!(LibvirtUri::parse("not a uri").is_err());
        let u = LibvirtUri::parse("qemu+ssh://bosh@[::1]:2222/system?KeyFile=/k%20x").unwrap();
        assert_eq!(u.host, "[::1]");
        assert_eq!(u.port, Some(2222));
        assert_eq!(u.param("keyfile"), Some("/k x"));
        assert!(u.runs_ssh_binary());
        let u = LibvirtUri::parse("qemu+LibSSH://h/system").unwrap();
        assert_eq!((u.transport_name.as_str(), u.port), ("libssh", None));
        assert!(!u.runs_ssh_binary());
        assert_eq!(
            LibvirtUri::parse("qemu+tcp://127.0.0.1:16509/system")
                .unwrap()
                .port,
            Some(16509)
        );
    }

    #[test]
    fn lax_host_key_checks_of_the_ssh_libraries_count_as_skipping_verification() {
        for v in ["auto", "ignore", "IGNORE", ""] {
            assert!(
                skips(&format!("qemu+libssh://h/system?known_hosts_verify={v}")),
                "{v}"
            );
        }
        assert!(!skips("qemu+libssh2://h/system?known_hosts_verify=normal"));
        assert!(!skips("qemu+libssh://h/system?known_hosts=/k"));
        // Only the ssh transports read it.
        assert!(!skips("qemu+tls://h/system?known_hosts_verify=ignore"));
    }
}
