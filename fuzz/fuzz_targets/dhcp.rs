//! What the network sends a DHCP client: any bytes must decode to a message or be refused,
//! never panic; a message that decodes yields a lease and encodes again.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(m) = dhcp::decode(data) {
        let mut mac = [0u8; 6];
        if let Some(c) = m.chaddr().get(..6) {
            mac.copy_from_slice(c);
        }
        let _ = dhcp::reply_to(data, m.xid(), &mac);
        let lease = dhcp::lease_from(&m, dhcp::server_id(&m));
        let _ = lease.to_string();
        let _ = dhcp::encode(&m);
    }
});
