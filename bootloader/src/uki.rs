//! Unified kernel images: what the node needs to know about one without booting it.

/// The kernel command line in a UKI: its `.cmdline` PE section, or the `cmdline=` line of a
/// simulated UKI (a text file starting with `PLINTH-SIM-UKI`).
pub fn cmdline(data: &[u8]) -> Option<String> {
    if let Some(text) = data.strip_prefix(b"PLINTH-SIM-UKI\n") {
        return String::from_utf8_lossy(text)
            .lines()
            .find_map(|l| l.strip_prefix("cmdline="))
            .map(str::to_owned);
    }
    use object::read::pe::PeFile64;
    let pe = PeFile64::parse(data).ok()?;
    let sections = pe.section_table();
    let section = sections.iter().find(|s| s.name.starts_with(b".cmdline"))?;
    let bytes = section.pe_data(data).ok()?;
    let size = section.virtual_size.get(object::LittleEndian) as usize;
    let bytes = &bytes[..size.min(bytes.len())];
    Some(
        String::from_utf8_lossy(bytes)
            .trim_end_matches('\0')
            .trim()
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_simulated_uki_carries_its_command_line() {
        assert_eq!(
            cmdline(b"PLINTH-SIM-UKI\ncmdline=plinth.slot=A panic=1\n").as_deref(),
            Some("plinth.slot=A panic=1")
        );
        assert_eq!(cmdline(b"garbage"), None);
    }
}
