//! Domain XML: `domain_xml(&VmSpec)` writes libvirt's `<domain>` document deterministically
//! (same spec, same bytes, checked by golden tests), escaping every value; and the reverse bits
//! we need from libvirt's XML: the epoch in our metadata element and device targets for stats.

use std::fmt::Write as _;

use crate::spec::{NicSource, VmSpec};

/// The XML namespace of our `<metadata>` element. A URN, because it only has to be unique.
pub const METADATA_NAMESPACE: &str = "urn:novacron:domain:1";
/// The prefix libvirt stores our metadata element under.
pub const METADATA_PREFIX: &str = "nc";

/// Escapes a value for XML text or a quoted attribute. Characters XML 1.0 cannot carry at all
/// (most C0 controls) are dropped rather than producing a document libvirt rejects.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 => {}
            c => out.push(c),
        }
    }
    out
}

/// A tiny indenting writer: every line goes through `line`, so indentation and newlines are
/// uniform and the output is byte-for-byte reproducible.
struct Writer {
    out: String,
    depth: usize,
}

impl Writer {
    fn line(&mut self, text: &str) {
        for _ in 0..self.depth {
            self.out.push_str("  ");
        }
        self.out.push_str(text);
        self.out.push('\n');
    }
    fn open(&mut self, text: &str) {
        self.line(text);
        self.depth += 1;
    }
    fn close(&mut self, text: &str) {
        self.depth = self.depth.saturating_sub(1);
        self.line(text);
    }
}

/// The libvirt domain XML for `spec`. Call `spec.validate()` first: this function escapes
/// values but does not judge them.
pub fn domain_xml(spec: &VmSpec) -> String {
    let mut w = Writer {
        out: String::new(),
        depth: 0,
    };
    w.open(&format!("<domain type='{}'>", spec.domain_type.as_str()));
    w.line(&format!("<name>{}</name>", escape(&spec.domain_name())));
    w.line(&format!("<uuid>{}</uuid>", spec.uuid.hyphenated()));
    w.open("<metadata>");
    w.open(&format!(
        "<{p}:instance xmlns:{p}='{ns}'>",
        p = METADATA_PREFIX,
        ns = METADATA_NAMESPACE
    ));
    w.line(&format!(
        "<{p}:vm-id>{}</{p}:vm-id>",
        escape(&spec.vm_id),
        p = METADATA_PREFIX
    ));
    w.line(&format!(
        "<{p}:epoch>{}</{p}:epoch>",
        spec.epoch,
        p = METADATA_PREFIX
    ));
    if !spec.owner.is_empty() {
        w.line(&format!(
            "<{p}:owner>{}</{p}:owner>",
            escape(&spec.owner),
            p = METADATA_PREFIX
        ));
    }
    w.close(&format!("</{}:instance>", METADATA_PREFIX));
    w.close("</metadata>");
    w.line(&format!("<memory unit='MiB'>{}</memory>", spec.memory_mib));
    w.line(&format!("<vcpu>{}</vcpu>", spec.vcpus));
    w.open("<os>");
    w.line("<type arch='x86_64' machine='pc'>hvm</type>");
    match &spec.boot {
        Some(boot) => {
            w.line(&format!(
                "<kernel>{}</kernel>",
                escape(&boot.kernel.to_string_lossy())
            ));
            if let Some(initrd) = &boot.initrd {
                w.line(&format!(
                    "<initrd>{}</initrd>",
                    escape(&initrd.to_string_lossy())
                ));
            }
            if let Some(cmdline) = &boot.cmdline {
                w.line(&format!("<cmdline>{}</cmdline>", escape(cmdline)));
            }
        }
        None => w.line("<boot dev='hd'/>"),
    }
    w.close("</os>");
    // ACPI lets `shutdown` ask the guest politely before the timeout forces it off.
    w.line("<features><acpi/></features>");
    // A guest-initiated power-off ends the domain; the agent decides what happens next.
    w.line("<on_poweroff>destroy</on_poweroff>");
    w.line("<on_reboot>restart</on_reboot>");
    w.line("<on_crash>destroy</on_crash>");
    w.open("<devices>");
    for disk in &spec.disks {
        w.open("<disk type='file' device='disk'>");
        w.line(&format!(
            "<driver name='qemu' type='{}'/>",
            disk.format.as_str()
        ));
        w.line(&format!(
            "<source file='{}'/>",
            escape(&disk.path.to_string_lossy())
        ));
        w.line(&format!(
            "<target dev='{}' bus='{}'/>",
            escape(&disk.target_dev),
            disk.bus().unwrap_or("virtio")
        ));
        if disk.readonly {
            w.line("<readonly/>");
        }
        w.close("</disk>");
    }
    for nic in &spec.nics {
        let (kind, attr, name) = match &nic.source {
            NicSource::Network(name) => ("network", "network", name),
            NicSource::Bridge(name) => ("bridge", "bridge", name),
        };
        w.open(&format!("<interface type='{kind}'>"));
        w.line(&format!("<mac address='{}'/>", escape(&nic.mac)));
        w.line(&format!("<source {attr}='{}'/>", escape(name)));
        w.line("<model type='virtio'/>");
        w.close("</interface>");
    }
    if spec.serial_console {
        w.open("<serial type='pty'>");
        w.line("<target port='0'/>");
        w.close("</serial>");
        w.open("<console type='pty'>");
        w.line("<target type='serial' port='0'/>");
        w.close("</console>");
    }
    // No USB controller and no balloon: fewer emulated devices boot faster under TCG.
    w.line("<controller type='usb' model='none'/>");
    w.line("<memballoon model='none'/>");
    w.close("</devices>");
    w.close("</domain>");
    w.out
}

/// Reads the epoch out of our metadata element as libvirt returns it (with or without the
/// namespace prefix: `virDomainGetMetadata` strips it, `dumpxml` keeps it).
pub fn parse_epoch(metadata_xml: &str) -> Option<u64> {
    for open in ["<epoch>", &format!("<{METADATA_PREFIX}:epoch>")] {
        if let Some(start) = metadata_xml.find(open) {
            let rest = &metadata_xml[start + open.len()..];
            let end = rest.find('<')?;
            return rest[..end].trim().parse().ok();
        }
    }
    None
}

/// Reads the owner out of our metadata element (see `VmSpec::owner`).
pub fn parse_owner(metadata_xml: &str) -> Option<String> {
    for open in ["<owner>", &format!("<{METADATA_PREFIX}:owner>")] {
        if let Some(start) = metadata_xml.find(open) {
            let rest = &metadata_xml[start + open.len()..];
            let end = rest.find('<')?;
            return Some(unescape(rest[..end].trim()));
        }
    }
    None
}

/// The device targets of a live domain's XML that statistics are asked for: `(disks, nics)`.
/// Disks are named by target dev; NICs by target dev when libvirt assigned one, else by MAC
/// (libvirt accepts either).
pub fn device_targets(domain_xml: &str) -> (Vec<String>, Vec<String>) {
    let disks = elements(domain_xml, "disk")
        .filter_map(|body| attr_of_tag(body, "target", "dev"))
        .collect();
    let nics = elements(domain_xml, "interface")
        .filter_map(|body| {
            attr_of_tag(body, "target", "dev").or_else(|| attr_of_tag(body, "mac", "address"))
        })
        .collect();
    (disks, nics)
}

/// The bodies of every `<name ...>...</name>` element (not nested in itself, which holds for
/// libvirt's `disk` and `interface`).
fn elements<'a>(xml: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    let open = format!("<{name} ");
    let close = format!("</{name}>");
    let mut rest = xml;
    std::iter::from_fn(move || {
        let start = rest.find(&open)?;
        let after = &rest[start..];
        let end = after.find(&close)?;
        let body = &after[..end];
        rest = &after[end + close.len()..];
        Some(body)
    })
}

/// The value of `attr` on the first `<tag ...>` in `body`, unescaped for the entities libvirt
/// writes.
fn attr_of_tag(body: &str, tag: &str, attr: &str) -> Option<String> {
    let start = body.find(&format!("<{tag} "))?;
    let tag_text = &body[start..];
    let tag_text = &tag_text[..tag_text.find('>')?];
    for quote in ['\'', '"'] {
        let key = format!("{attr}={quote}");
        if let Some(pos) = tag_text.find(&key) {
            let value = &tag_text[pos + key.len()..];
            let value = &value[..value.find(quote)?];
            return Some(unescape(value));
        }
    }
    None
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let Some(semi) = rest.find(';') else { break };
        match &rest[..=semi] {
            "&amp;" => out.push('&'),
            "&lt;" => out.push('<'),
            "&gt;" => out.push('>'),
            "&apos;" => out.push('\''),
            "&quot;" => out.push('"'),
            other => {
                let _ = write!(out, "{other}");
            }
        }
        rest = &rest[semi + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(
            escape("a&b<c>d'e\"f\u{1}g"),
            "a&amp;b&lt;c&gt;d&apos;e&quot;fg"
        );
    }

    #[test]
    fn epoch_is_read_with_or_without_prefix() {
        assert_eq!(
            parse_epoch("<instance>\n  <epoch>7</epoch>\n</instance>"),
            Some(7)
        );
        assert_eq!(
            parse_epoch("<nc:instance xmlns:nc='x'><nc:epoch>42</nc:epoch></nc:instance>"),
            Some(42)
        );
        assert_eq!(parse_epoch("<instance/>"), None);
    }

    #[test]
    fn device_targets_prefer_dev_then_mac() {
        let xml = "<devices><disk type='file' device='disk'><source file='/a&amp;b'/>\
                   <target dev='vda' bus='virtio'/></disk>\
                   <interface type='network'><mac address='52:54:00:00:00:01'/>\
                   <target dev='vnet3'/></interface>\
                   <interface type='bridge'><mac address='52:54:00:00:00:02'/></interface>\
                   </devices>";
        let (disks, nics) = device_targets(xml);
        assert_eq!(disks, vec!["vda"]);
        assert_eq!(nics, vec!["vnet3", "52:54:00:00:00:02"]);
        assert_eq!(unescape("a&amp;b&lt;&apos;"), "a&b<'");
    }
}
