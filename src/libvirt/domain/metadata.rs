//! The `bosh` metadata element the CPI keeps in each domain (what later calls
//! need: agent id, stemcell, NICs and their DHCP reservations, BOSH's own
//! metadata; never the agent env, which holds secrets), and what the CPI
//! reads back from a domain's XML.

use crate::libvirt::xmltree::Element;
use crate::libvirt::xmlwrite::El;
use crate::names::{METADATA_NS, METADATA_PREFIX};

pub use crate::host::{DomainFacts, NicRecord, VmMetadata};

impl VmMetadata {
    /// The element as `virDomainSetMetadata` takes it: no prefixes (libvirt
    /// puts the element and its children into the namespace).
    pub fn inner_xml(&self) -> String {
        self.element("").to_compact()
    }

    /// The element as it appears inside a domain's `<metadata>`, the way
    /// libvirt itself writes it after a `virDomainSetMetadata`.
    pub fn domain_xml(&self) -> String {
        self.domain_element().to_compact()
    }

    pub(crate) fn domain_element(&self) -> El {
        self.element(&format!("{METADATA_PREFIX}:"))
    }

    /// `<vm>` with every element name prefixed by `p`, which is declared.
    fn element(&self, p: &str) -> El {
        let name = |n: &str| format!("{p}{n}");
        let mut vm = El::new(name("vm"));
        if !p.is_empty() {
            vm = vm.attr(format!("xmlns:{METADATA_PREFIX}"), METADATA_NS);
        }
        let networks = self.networks.iter().map(|n| {
            El::new(name("network"))
                .attr("name", &n.network)
                .attr("type", &n.kind)
                .attr_opt("libvirt_network", n.libvirt_network.as_ref())
                .attr_opt("mac", n.mac.as_ref())
                .attr_opt("ip", n.ip.as_ref())
                .attr_opt("dhcp_host", n.dhcp_host.as_ref())
        });
        let tags = self
            .tags
            .iter()
            .map(|(k, v)| El::new(name("tag")).attr("name", k).text(v));
        vm.text_child(name("agent_id"), &self.agent_id)
            .text_child(name("stemcell"), &self.stemcell)
            .text_child(name("created_at"), &self.created_at)
            .child(El::new(name("networks")).children(networks))
            .child(El::new(name("bosh_metadata")).children(tags))
            .children(
                self.creating
                    .as_ref()
                    .map(|c| El::new(name("creating")).text(c)),
            )
    }

    pub fn from_element(el: &Element) -> VmMetadata {
        let text = |name: &str| {
            el.child(name)
                .map(|c| c.text_trimmed().to_string())
                .unwrap_or_default()
        };
        let networks = el
            .child("networks")
            .map(|ns| {
                ns.children_named("network")
                    .map(|n| {
                        let a = |k: &str| n.attr(k).map(str::to_string);
                        NicRecord {
                            network: a("name").unwrap_or_default(),
                            kind: a("type").unwrap_or_default(),
                            libvirt_network: a("libvirt_network"),
                            mac: a("mac"),
                            ip: a("ip"),
                            dhcp_host: a("dhcp_host"),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let tags = el
            .child("bosh_metadata")
            .map(|m| {
                m.children_named("tag")
                    .map(|t| {
                        (
                            t.attr("name").unwrap_or_default().to_string(),
                            t.text.clone(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        VmMetadata {
            agent_id: text("agent_id"),
            stemcell: text("stemcell"),
            created_at: text("created_at"),
            networks,
            tags,
            creating: el.child("creating").map(|c| c.text_trimmed().to_string()),
        }
    }
}

impl DomainFacts {
    pub fn from_xml(xml: &str) -> std::result::Result<DomainFacts, String> {
        let root = Element::parse(xml)?;
        let interfaces = root
            .child("devices")
            .map(|d| {
                d.children_named("interface")
                    .filter_map(|i| {
                        let mac = i.child("mac")?.attr("address")?.to_ascii_lowercase();
                        let net = i
                            .child("source")
                            .and_then(|s| s.attr("network"))
                            .unwrap_or_default()
                            .to_string();
                        Some((mac, net))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let metadata = root.child("metadata").and_then(|m| {
            m.children
                .iter()
                .find(|c| c.local_name() == "vm" && c.in_namespace(METADATA_NS))
                .map(VmMetadata::from_element)
        });
        let title = root.child("title").map(|t| t.text.clone());
        Ok(DomainFacts {
            interfaces,
            metadata,
            title,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::xmlwrite::HOSTILE;

    #[test]
    fn metadata_as_libvirt_returns_it() {
        // virDomainGetMetadata / dumpxml give the element back like this.
        let xml = "<domain><metadata><other:vm xmlns:other='urn:else'><agent_id>x</agent_id></other:vm>\
            <bosh:vm xmlns:bosh=\"urn:bosh-libvirt-cpi:vm:1\">\n  <agent_id>a1</agent_id>\n  <stemcell>sc-2</stemcell>\n\
            <networks><network name='n' type='dynamic' libvirt_network='l' mac='m'/></networks>\
            <bosh_metadata><tag name='name'>j/0</tag></bosh_metadata></bosh:vm></metadata><title>t</title></domain>";
        let f = DomainFacts::from_xml(xml).unwrap();
        let md = f.metadata.unwrap();
        assert_eq!(md.agent_id, "a1");
        assert_eq!(md.networks[0].mac.as_deref(), Some("m"));
        assert_eq!(md.networks[0].ip, None);
        assert_eq!(md.tags, vec![("name".to_string(), "j/0".to_string())]);
        assert_eq!(f.title.as_deref(), Some("t"));
        assert!(md.inner_xml().starts_with("<vm><agent_id>a1</agent_id>"));
    }

    #[test]
    fn hostile_metadata_round_trips_in_both_forms() {
        for v in HOSTILE {
            let md = VmMetadata {
                agent_id: format!("a{v}z"),
                stemcell: format!("s{v}z"),
                created_at: "2026-01-01T00:00:00Z".into(),
                networks: vec![NicRecord {
                    network: v.to_string(),
                    kind: "manual".into(),
                    libvirt_network: Some(v.to_string()),
                    mac: Some(v.to_string()),
                    ip: None,
                    dhcp_host: Some(v.to_string()),
                }],
                tags: vec![(v.to_string(), v.to_string()), ("k".into(), v.to_string())],
                creating: None,
            };
            let inner = Element::parse(&md.inner_xml()).unwrap();
            assert_eq!(VmMetadata::from_element(&inner), md, "{v:?}");
            let names: Vec<_> = inner.children.iter().map(|c| c.name.as_str()).collect();
            assert_eq!(
                names,
                [
                    "agent_id",
                    "stemcell",
                    "created_at",
                    "networks",
                    "bosh_metadata"
                ]
            );
            let domain = format!("<domain><metadata>{}</metadata></domain>", md.domain_xml());
            assert_eq!(DomainFacts::from_xml(&domain).unwrap().metadata, Some(md));
        }
    }
}
