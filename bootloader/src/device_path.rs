//! UEFI device paths: a lossless codec and the efibootmgr/edk2 text form.
//!
//! A device path is a packed list of nodes, each `type u8, subtype u8, length u16 LE, data`.
//! [`DevicePath::decode`] splits the bytes into nodes and types the ones OVMF and efibootmgr
//! emit; any node it does not know, or whose length does not match the layout it knows, stays
//! [`DevicePathNode::Raw`]. Encoding writes every node back, so `encode(decode(b)) == b` for
//! every `b` that decodes. End nodes are ordinary nodes here (not implied), which keeps
//! multi-instance paths (`ConIn`) and load options with several paths intact.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use uuid::Uuid;

/// Node type: hardware (`Pci`, `VenHw`).
pub const TYPE_HARDWARE: u8 = 0x01;
/// Node type: ACPI (`PciRoot`, `Acpi`, `AcpiAdr`).
pub const TYPE_ACPI: u8 = 0x02;
/// Node type: messaging (`NVMe`, `Sata`, `MAC`, `IPv4`, `Uri`, …).
pub const TYPE_MESSAGING: u8 = 0x03;
/// Node type: media (`HD`, `File`, `Fv`, `FvFile`).
pub const TYPE_MEDIA: u8 = 0x04;
/// Node type: BIOS boot specification.
pub const TYPE_BBS: u8 = 0x05;
/// Node type: end of a device path instance or of the whole path.
pub const TYPE_END: u8 = 0x7f;

/// `HardDrive::signature_type` for a GPT partition GUID.
pub const SIGNATURE_TYPE_GUID: u8 = 0x02;
/// `HardDrive::signature_type` for a 32-bit MBR disk signature.
pub const SIGNATURE_TYPE_MBR: u8 = 0x01;
/// `HardDrive::partition_format` for a GPT disk.
pub const PARTITION_FORMAT_GPT: u8 = 0x02;

// Subtypes, by type. Only the ones decoded here.
const HW_PCI: u8 = 0x01;
const HW_VENDOR: u8 = 0x04;
const ACPI_HID: u8 = 0x01;
const ACPI_ADR: u8 = 0x03;
const MSG_ATAPI: u8 = 0x01;
const MSG_VENDOR: u8 = 0x0a;
const MSG_MAC: u8 = 0x0b;
const MSG_IPV4: u8 = 0x0c;
const MSG_IPV6: u8 = 0x0d;
const MSG_UART: u8 = 0x0e;
const MSG_USB_CLASS: u8 = 0x0f;
const MSG_SATA: u8 = 0x12;
const MSG_NVME: u8 = 0x17;
const MSG_URI: u8 = 0x18;
const MEDIA_HARD_DRIVE: u8 = 0x01;
const MEDIA_VENDOR: u8 = 0x03;
const MEDIA_FILE_PATH: u8 = 0x04;
const MEDIA_FV_FILE: u8 = 0x06;
const MEDIA_FV: u8 = 0x07;
const END_INSTANCE: u8 = 0x01;
const END_ENTIRE: u8 = 0xff;

const HEADER_LEN: usize = 4;

/// A device path: the nodes in the order they appear, End nodes included.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DevicePath {
    /// Every node, End nodes included, exactly as encoded.
    pub nodes: Vec<DevicePathNode>,
}

/// One device-path node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevicePathNode {
    /// Hardware/PCI: `Pci(device,function)`.
    Pci {
        /// PCI function number.
        function: u8,
        /// PCI device number.
        device: u8,
    },
    /// ACPI `_HID`/`_UID` node: `PciRoot(uid)`, `Acpi(PNP0303,uid)`, ….
    Acpi {
        /// Compressed EISA id (`0x0a0341d0` is PNP0A03, a PCI root bridge).
        hid: u32,
        /// `_UID`.
        uid: u32,
    },
    /// ACPI `_ADR` node (display outputs): `AcpiAdr(0x80010100)`.
    AcpiAdr(Vec<u32>),
    /// Messaging/ATAPI: `Ata(Secondary,Master,0x0)`.
    Atapi {
        /// 0 primary, 1 secondary.
        primary_secondary: u8,
        /// 0 master, 1 slave.
        slave_master: u8,
        /// Logical unit.
        lun: u16,
    },
    /// Messaging/SATA: `Sata(hba_port,port_multiplier_port,lun)`.
    Sata {
        /// HBA port.
        hba_port: u16,
        /// Port multiplier port, `0xffff` when directly attached.
        port_multiplier_port: u16,
        /// Logical unit.
        lun: u16,
    },
    /// Messaging/NVMe namespace: `NVMe(0x1,00-00-00-00-00-00-00-00)`.
    Nvme {
        /// Namespace id.
        namespace_id: u32,
        /// IEEE EUI-64, in the order stored.
        eui64: [u8; 8],
    },
    /// Messaging/MAC address: `MAC(525400123456,0x1)`.
    MacAddress {
        /// Address, zero-padded to 32 bytes.
        address: [u8; 32],
        /// Network interface type (RFC 3232); 0 or 1 means a 6-byte Ethernet address.
        if_type: u8,
    },
    /// Messaging/IPv4.
    Ipv4(Ipv4Node),
    /// Messaging/IPv6.
    Ipv6(Ipv6Node),
    /// Messaging/UART: `Uart(115200,8,N,1)`.
    Uart(UartNode),
    /// Messaging/USB class: `UsbClass(0xffff,0xffff,0x3,0x1,0x1)`.
    UsbClass {
        /// USB vendor id (`0xffff` matches any).
        vendor_id: u16,
        /// USB product id (`0xffff` matches any).
        product_id: u16,
        /// Device class.
        class: u8,
        /// Device subclass.
        subclass: u8,
        /// Device protocol.
        protocol: u8,
    },
    /// Messaging/URI (HTTP boot): the URI bytes as stored, possibly empty.
    Uri(Vec<u8>),
    /// Vendor-defined node (hardware, messaging or media).
    Vendor(VendorNode),
    /// Media/Hard drive: `HD(1,GPT,<guid>,0x800,0x28000)`.
    HardDrive(HardDrive),
    /// Media/File path: `File(\EFI\plinth\A.efi)`. Stored without its NUL terminator.
    FilePath(String),
    /// Media/PIWG firmware file: `FvFile(<guid>)`.
    FirmwareFile(Uuid),
    /// Media/PIWG firmware volume: `Fv(<guid>)`.
    FirmwareVolume(Uuid),
    /// End of this instance; another instance follows (`,` in text).
    EndInstance,
    /// End of the entire device path.
    EndEntire,
    /// Any other node, or a known one whose bytes do not fit its layout: kept verbatim.
    Raw(RawNode),
}

/// A node kept as bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawNode {
    /// Node type.
    pub node_type: u8,
    /// Node subtype.
    pub subtype: u8,
    /// Everything after the 4-byte header.
    pub data: Vec<u8>,
}

/// Media/Hard drive node: which partition of which disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HardDrive {
    /// Partition number, 1-based.
    pub partition_number: u32,
    /// First LBA of the partition.
    pub partition_start: u64,
    /// Size in LBAs.
    pub partition_size: u64,
    /// GPT unique partition GUID (EFI byte order) or MBR signature in the first 4 bytes.
    pub signature: [u8; 16],
    /// 1 legacy MBR, 2 GPT.
    pub partition_format: u8,
    /// 0 none, 1 MBR signature, 2 GUID.
    pub signature_type: u8,
}

impl HardDrive {
    /// A GPT partition, as efibootmgr writes it.
    pub fn gpt(partition_number: u32, partition_guid: Uuid, start_lba: u64, size_lba: u64) -> Self {
        HardDrive {
            partition_number,
            partition_start: start_lba,
            partition_size: size_lba,
            signature: partition_guid.to_bytes_le(),
            partition_format: PARTITION_FORMAT_GPT,
            signature_type: SIGNATURE_TYPE_GUID,
        }
    }

    /// The unique partition GUID, if the signature is one.
    pub fn partition_guid(&self) -> Option<Uuid> {
        (self.signature_type == SIGNATURE_TYPE_GUID).then(|| Uuid::from_bytes_le(self.signature))
    }
}

/// Messaging/IPv4 node (UEFI 2.x layout, 27 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4Node {
    /// Local address.
    pub local_address: Ipv4Addr,
    /// Remote address.
    pub remote_address: Ipv4Addr,
    /// Local port.
    pub local_port: u16,
    /// Remote port.
    pub remote_port: u16,
    /// IP protocol number (6 TCP, 17 UDP).
    pub protocol: u16,
    /// 0 DHCP, 1 static (kept as a byte so any value round-trips).
    pub static_address: u8,
    /// Gateway.
    pub gateway: Ipv4Addr,
    /// Subnet mask.
    pub subnet_mask: Ipv4Addr,
}

/// Messaging/IPv6 node (UEFI 2.x layout, 60 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6Node {
    /// Local address.
    pub local_address: Ipv6Addr,
    /// Remote address.
    pub remote_address: Ipv6Addr,
    /// Local port.
    pub local_port: u16,
    /// Remote port.
    pub remote_port: u16,
    /// IP protocol number.
    pub protocol: u16,
    /// 0 static, 1 stateless autoconfiguration, 2 stateful autoconfiguration.
    pub address_origin: u8,
    /// Prefix length.
    pub prefix_length: u8,
    /// Gateway.
    pub gateway: Ipv6Addr,
}

/// Messaging/UART node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UartNode {
    /// Reserved word, kept so it round-trips.
    pub reserved: u32,
    /// Baud rate, 0 for the device default.
    pub baud_rate: u64,
    /// Data bits, 0 for the default.
    pub data_bits: u8,
    /// 0 default, 1 none, 2 even, 3 odd, 4 mark, 5 space.
    pub parity: u8,
    /// 0 default, 1 one, 2 one and a half, 3 two.
    pub stop_bits: u8,
}

/// Which node type a vendor node belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VendorKind {
    /// `VenHw` (type 1, subtype 4).
    Hardware,
    /// `VenMsg` (type 3, subtype 10).
    Messaging,
    /// `VenMedia` (type 4, subtype 3).
    Media,
}

/// A vendor-defined node: a GUID and opaque data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VendorNode {
    /// Node type it belongs to.
    pub kind: VendorKind,
    /// Vendor GUID.
    pub guid: Uuid,
    /// Vendor data after the GUID.
    pub data: Vec<u8>,
}

/// Why device-path bytes could not be decoded or a device path could not be encoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DevicePathError {
    /// Fewer than 4 bytes left where a node header should start.
    #[error("device path node at byte {offset} is cut short: {remaining} bytes left, a node header needs 4")]
    TruncatedHeader {
        /// Offset of the node in the device path.
        offset: usize,
        /// Bytes left.
        remaining: usize,
    },
    /// A node length smaller than the header itself (would loop forever or underflow).
    #[error(
        "device path node at byte {offset} declares length {length}, less than its 4-byte header"
    )]
    LengthTooSmall {
        /// Offset of the node.
        offset: usize,
        /// Declared length.
        length: u16,
    },
    /// A node length running past the end of the device path.
    #[error("device path node at byte {offset} declares length {length} but only {remaining} bytes remain")]
    Overrun {
        /// Offset of the node.
        offset: usize,
        /// Declared length.
        length: u16,
        /// Bytes left from `offset`.
        remaining: usize,
    },
    /// A node whose data does not fit the 16-bit length field.
    #[error("device path node {node} would be {len} bytes, more than the 65535 a node can hold")]
    NodeTooLong {
        /// The node's text form.
        node: String,
        /// Its encoded length.
        len: usize,
    },
    /// A file path with a NUL inside would decode as a shorter path.
    #[error("file path {path:?} contains a NUL character")]
    NulInFilePath {
        /// The offending path.
        path: String,
    },
}

impl DevicePath {
    /// Splits `bytes` into nodes. Fails only when the node lengths do not tile the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DevicePathError> {
        let mut nodes = Vec::new();
        let mut offset = 0usize;
        let mut rest = bytes;
        while !rest.is_empty() {
            let Some((&[node_type, subtype, l0, l1], _)) = rest.split_first_chunk::<HEADER_LEN>()
            else {
                return Err(DevicePathError::TruncatedHeader {
                    offset,
                    remaining: rest.len(),
                });
            };
            let length = u16::from_le_bytes([l0, l1]);
            let len = usize::from(length);
            if len < HEADER_LEN {
                return Err(DevicePathError::LengthTooSmall { offset, length });
            }
            let (node, after) = rest.split_at_checked(len).ok_or(DevicePathError::Overrun {
                offset,
                length,
                remaining: rest.len(),
            })?;
            let data = node.get(HEADER_LEN..).unwrap_or_default();
            nodes.push(DevicePathNode::decode(node_type, subtype, data));
            offset += len;
            rest = after;
        }
        Ok(DevicePath { nodes })
    }

    /// Encodes every node in order.
    pub fn encode(&self) -> Result<Vec<u8>, DevicePathError> {
        let mut out = Vec::new();
        for node in &self.nodes {
            node.encode_into(&mut out)?;
        }
        Ok(out)
    }

    /// The first `HD(…)` node of the first path (before the first End-entire node).
    pub fn hard_drive(&self) -> Option<&HardDrive> {
        self.first_path().find_map(|n| match n {
            DevicePathNode::HardDrive(hd) => Some(hd),
            _ => None,
        })
    }

    /// The first `File(…)` node of the first path (before the first End-entire node).
    pub fn file_path(&self) -> Option<&str> {
        self.first_path().find_map(|n| match n {
            DevicePathNode::FilePath(p) => Some(p.as_str()),
            _ => None,
        })
    }

    fn first_path(&self) -> impl Iterator<Item = &DevicePathNode> {
        self.nodes
            .iter()
            .take_while(|n| !matches!(n, DevicePathNode::EndEntire))
    }
}

impl DevicePathNode {
    /// Types a node from its header fields and data; anything unexpected stays raw.
    fn decode(node_type: u8, subtype: u8, data: &[u8]) -> Self {
        Self::decode_typed(node_type, subtype, data).unwrap_or_else(|| {
            DevicePathNode::Raw(RawNode {
                node_type,
                subtype,
                data: data.to_vec(),
            })
        })
    }

    // Each arm checks the exact length first: a node with extra or missing bytes would not
    // re-encode identically, so it stays raw.
    fn decode_typed(node_type: u8, subtype: u8, data: &[u8]) -> Option<Self> {
        let mut r = Fields(data);
        let node = match (node_type, subtype, data.len()) {
            (TYPE_HARDWARE, HW_PCI, 2) => DevicePathNode::Pci {
                function: r.u8()?,
                device: r.u8()?,
            },
            (TYPE_ACPI, ACPI_HID, 8) => DevicePathNode::Acpi {
                hid: r.u32()?,
                uid: r.u32()?,
            },
            (TYPE_ACPI, ACPI_ADR, n) if n >= 4 && n.is_multiple_of(4) => {
                let mut adrs = Vec::with_capacity(n / 4);
                while let Some(adr) = r.u32() {
                    adrs.push(adr);
                }
                DevicePathNode::AcpiAdr(adrs)
            }
            (TYPE_MESSAGING, MSG_ATAPI, 4) => DevicePathNode::Atapi {
                primary_secondary: r.u8()?,
                slave_master: r.u8()?,
                lun: r.u16()?,
            },
            (TYPE_MESSAGING, MSG_SATA, 6) => DevicePathNode::Sata {
                hba_port: r.u16()?,
                port_multiplier_port: r.u16()?,
                lun: r.u16()?,
            },
            (TYPE_MESSAGING, MSG_NVME, 12) => DevicePathNode::Nvme {
                namespace_id: r.u32()?,
                eui64: r.array()?,
            },
            (TYPE_MESSAGING, MSG_MAC, 33) => DevicePathNode::MacAddress {
                address: r.array()?,
                if_type: r.u8()?,
            },
            (TYPE_MESSAGING, MSG_IPV4, 23) => DevicePathNode::Ipv4(Ipv4Node {
                local_address: Ipv4Addr::from(r.array::<4>()?),
                remote_address: Ipv4Addr::from(r.array::<4>()?),
                local_port: r.u16()?,
                remote_port: r.u16()?,
                protocol: r.u16()?,
                static_address: r.u8()?,
                gateway: Ipv4Addr::from(r.array::<4>()?),
                subnet_mask: Ipv4Addr::from(r.array::<4>()?),
            }),
            (TYPE_MESSAGING, MSG_IPV6, 56) => DevicePathNode::Ipv6(Ipv6Node {
                local_address: Ipv6Addr::from(r.array::<16>()?),
                remote_address: Ipv6Addr::from(r.array::<16>()?),
                local_port: r.u16()?,
                remote_port: r.u16()?,
                protocol: r.u16()?,
                address_origin: r.u8()?,
                prefix_length: r.u8()?,
                gateway: Ipv6Addr::from(r.array::<16>()?),
            }),
            (TYPE_MESSAGING, MSG_UART, 15) => DevicePathNode::Uart(UartNode {
                reserved: r.u32()?,
                baud_rate: r.u64()?,
                data_bits: r.u8()?,
                parity: r.u8()?,
                stop_bits: r.u8()?,
            }),
            (TYPE_MESSAGING, MSG_USB_CLASS, 7) => DevicePathNode::UsbClass {
                vendor_id: r.u16()?,
                product_id: r.u16()?,
                class: r.u8()?,
                subclass: r.u8()?,
                protocol: r.u8()?,
            },
            (TYPE_MESSAGING, MSG_URI, _) => DevicePathNode::Uri(data.to_vec()),
            (TYPE_HARDWARE, HW_VENDOR, n)
            | (TYPE_MESSAGING, MSG_VENDOR, n)
            | (TYPE_MEDIA, MEDIA_VENDOR, n)
                if n >= 16 =>
            {
                let kind = match node_type {
                    TYPE_HARDWARE => VendorKind::Hardware,
                    TYPE_MESSAGING => VendorKind::Messaging,
                    _ => VendorKind::Media,
                };
                DevicePathNode::Vendor(VendorNode {
                    kind,
                    guid: Uuid::from_bytes_le(r.array()?),
                    data: r.rest().to_vec(),
                })
            }
            (TYPE_MEDIA, MEDIA_HARD_DRIVE, 38) => DevicePathNode::HardDrive(HardDrive {
                partition_number: r.u32()?,
                partition_start: r.u64()?,
                partition_size: r.u64()?,
                signature: r.array()?,
                partition_format: r.u8()?,
                signature_type: r.u8()?,
            }),
            (TYPE_MEDIA, MEDIA_FILE_PATH, _) => DevicePathNode::FilePath(decode_file_path(data)?),
            (TYPE_MEDIA, MEDIA_FV_FILE, 16) => {
                DevicePathNode::FirmwareFile(Uuid::from_bytes_le(r.array()?))
            }
            (TYPE_MEDIA, MEDIA_FV, 16) => {
                DevicePathNode::FirmwareVolume(Uuid::from_bytes_le(r.array()?))
            }
            (TYPE_END, END_INSTANCE, 0) => DevicePathNode::EndInstance,
            (TYPE_END, END_ENTIRE, 0) => DevicePathNode::EndEntire,
            _ => return None,
        };
        Some(node)
    }

    /// The node's (type, subtype).
    pub fn kind(&self) -> (u8, u8) {
        match self {
            DevicePathNode::Pci { .. } => (TYPE_HARDWARE, HW_PCI),
            DevicePathNode::Acpi { .. } => (TYPE_ACPI, ACPI_HID),
            DevicePathNode::AcpiAdr(_) => (TYPE_ACPI, ACPI_ADR),
            DevicePathNode::Atapi { .. } => (TYPE_MESSAGING, MSG_ATAPI),
            DevicePathNode::Sata { .. } => (TYPE_MESSAGING, MSG_SATA),
            DevicePathNode::Nvme { .. } => (TYPE_MESSAGING, MSG_NVME),
            DevicePathNode::MacAddress { .. } => (TYPE_MESSAGING, MSG_MAC),
            DevicePathNode::Ipv4(_) => (TYPE_MESSAGING, MSG_IPV4),
            DevicePathNode::Ipv6(_) => (TYPE_MESSAGING, MSG_IPV6),
            DevicePathNode::Uart(_) => (TYPE_MESSAGING, MSG_UART),
            DevicePathNode::UsbClass { .. } => (TYPE_MESSAGING, MSG_USB_CLASS),
            DevicePathNode::Uri(_) => (TYPE_MESSAGING, MSG_URI),
            DevicePathNode::Vendor(v) => match v.kind {
                VendorKind::Hardware => (TYPE_HARDWARE, HW_VENDOR),
                VendorKind::Messaging => (TYPE_MESSAGING, MSG_VENDOR),
                VendorKind::Media => (TYPE_MEDIA, MEDIA_VENDOR),
            },
            DevicePathNode::HardDrive(_) => (TYPE_MEDIA, MEDIA_HARD_DRIVE),
            DevicePathNode::FilePath(_) => (TYPE_MEDIA, MEDIA_FILE_PATH),
            DevicePathNode::FirmwareFile(_) => (TYPE_MEDIA, MEDIA_FV_FILE),
            DevicePathNode::FirmwareVolume(_) => (TYPE_MEDIA, MEDIA_FV),
            DevicePathNode::EndInstance => (TYPE_END, END_INSTANCE),
            DevicePathNode::EndEntire => (TYPE_END, END_ENTIRE),
            DevicePathNode::Raw(raw) => (raw.node_type, raw.subtype),
        }
    }

    /// The node's data, without its header.
    fn data(&self) -> Result<Vec<u8>, DevicePathError> {
        let mut d = Vec::new();
        match self {
            DevicePathNode::Pci { function, device } => d.extend([*function, *device]),
            DevicePathNode::Acpi { hid, uid } => {
                d.extend(hid.to_le_bytes());
                d.extend(uid.to_le_bytes());
            }
            DevicePathNode::AcpiAdr(adrs) => adrs.iter().for_each(|a| d.extend(a.to_le_bytes())),
            DevicePathNode::Atapi {
                primary_secondary,
                slave_master,
                lun,
            } => {
                d.extend([*primary_secondary, *slave_master]);
                d.extend(lun.to_le_bytes());
            }
            DevicePathNode::Sata {
                hba_port,
                port_multiplier_port,
                lun,
            } => {
                d.extend(hba_port.to_le_bytes());
                d.extend(port_multiplier_port.to_le_bytes());
                d.extend(lun.to_le_bytes());
            }
            DevicePathNode::Nvme {
                namespace_id,
                eui64,
            } => {
                d.extend(namespace_id.to_le_bytes());
                d.extend(eui64);
            }
            DevicePathNode::MacAddress { address, if_type } => {
                d.extend(address);
                d.push(*if_type);
            }
            DevicePathNode::Ipv4(ip) => {
                d.extend(ip.local_address.octets());
                d.extend(ip.remote_address.octets());
                d.extend(ip.local_port.to_le_bytes());
                d.extend(ip.remote_port.to_le_bytes());
                d.extend(ip.protocol.to_le_bytes());
                d.push(ip.static_address);
                d.extend(ip.gateway.octets());
                d.extend(ip.subnet_mask.octets());
            }
            DevicePathNode::Ipv6(ip) => {
                d.extend(ip.local_address.octets());
                d.extend(ip.remote_address.octets());
                d.extend(ip.local_port.to_le_bytes());
                d.extend(ip.remote_port.to_le_bytes());
                d.extend(ip.protocol.to_le_bytes());
                d.extend([ip.address_origin, ip.prefix_length]);
                d.extend(ip.gateway.octets());
            }
            DevicePathNode::Uart(u) => {
                d.extend(u.reserved.to_le_bytes());
                d.extend(u.baud_rate.to_le_bytes());
                d.extend([u.data_bits, u.parity, u.stop_bits]);
            }
            DevicePathNode::UsbClass {
                vendor_id,
                product_id,
                class,
                subclass,
                protocol,
            } => {
                d.extend(vendor_id.to_le_bytes());
                d.extend(product_id.to_le_bytes());
                d.extend([*class, *subclass, *protocol]);
            }
            DevicePathNode::Uri(uri) => d.extend(uri),
            DevicePathNode::Vendor(v) => {
                d.extend(v.guid.to_bytes_le());
                d.extend(&v.data);
            }
            DevicePathNode::HardDrive(hd) => {
                d.extend(hd.partition_number.to_le_bytes());
                d.extend(hd.partition_start.to_le_bytes());
                d.extend(hd.partition_size.to_le_bytes());
                d.extend(hd.signature);
                d.extend([hd.partition_format, hd.signature_type]);
            }
            DevicePathNode::FilePath(path) => {
                if path.contains('\0') {
                    return Err(DevicePathError::NulInFilePath { path: path.clone() });
                }
                path.encode_utf16()
                    .chain([0])
                    .for_each(|u| d.extend(u.to_le_bytes()));
            }
            DevicePathNode::FirmwareFile(guid) | DevicePathNode::FirmwareVolume(guid) => {
                d.extend(guid.to_bytes_le());
            }
            DevicePathNode::EndInstance | DevicePathNode::EndEntire => {}
            DevicePathNode::Raw(raw) => d.extend(&raw.data),
        }
        Ok(d)
    }

    /// Appends the node (header and data) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), DevicePathError> {
        let data = self.data()?;
        let len = data.len() + HEADER_LEN;
        let length = u16::try_from(len).map_err(|_| DevicePathError::NodeTooLong {
            node: self.to_string(),
            len,
        })?;
        let (node_type, subtype) = self.kind();
        out.extend([node_type, subtype]);
        out.extend(length.to_le_bytes());
        out.extend(data);
        Ok(())
    }
}

/// A file path node's text, when its data is well-formed UTF-16LE with exactly one NUL, at the end.
fn decode_file_path(data: &[u8]) -> Option<String> {
    let units = utf16le_units(data)?;
    let (&last, body) = units.split_last()?;
    if last != 0 || body.contains(&0) {
        return None;
    }
    String::from_utf16(body).ok()
}

/// UTF-16LE code units, or `None` for an odd number of bytes.
pub(crate) fn utf16le_units(bytes: &[u8]) -> Option<Vec<u16>> {
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(2)
            .filter_map(|c| c.try_into().ok())
            .map(u16::from_le_bytes)
            .collect(),
    )
}

/// Reads little-endian fields off the front of a slice; `None` once it runs out.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }
    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

impl fmt::Display for DevicePath {
    /// Nodes joined by `/`; an End-instance node prints `,` (as edk2 does); End-entire prints
    /// nothing, and a further path after it (a load option may carry several) follows a `;`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        #[derive(PartialEq)]
        enum Sep {
            Start,
            Slash,
            None,
            Semicolon,
        }
        let mut sep = Sep::Start;
        for node in &self.nodes {
            match node {
                DevicePathNode::EndInstance => {
                    f.write_str(",")?;
                    sep = Sep::None;
                }
                DevicePathNode::EndEntire => {
                    if sep != Sep::Start {
                        sep = Sep::Semicolon;
                    }
                }
                _ => {
                    match sep {
                        Sep::Slash => f.write_str("/")?,
                        Sep::Semicolon => f.write_str(";")?,
                        Sep::Start | Sep::None => {}
                    }
                    write!(f, "{node}")?;
                    sep = Sep::Slash;
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for DevicePathNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DevicePathNode::Pci { function, device } => write!(f, "Pci({device:#x},{function:#x})"),
            DevicePathNode::Acpi { hid, uid } => fmt_acpi(f, *hid, *uid),
            DevicePathNode::AcpiAdr(adrs) => {
                f.write_str("AcpiAdr(")?;
                for (i, adr) in adrs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{adr:#x}")?;
                }
                f.write_str(")")
            }
            DevicePathNode::Atapi {
                primary_secondary,
                slave_master,
                lun,
            } => {
                let ps = if *primary_secondary == 0 {
                    "Primary"
                } else {
                    "Secondary"
                };
                let sm = if *slave_master == 0 {
                    "Master"
                } else {
                    "Slave"
                };
                write!(f, "Ata({ps},{sm},{lun:#x})")
            }
            DevicePathNode::Sata {
                hba_port,
                port_multiplier_port,
                lun,
            } => write!(f, "Sata({hba_port:#x},{port_multiplier_port:#x},{lun:#x})"),
            DevicePathNode::Nvme {
                namespace_id,
                eui64,
            } => {
                write!(f, "NVMe({namespace_id:#x},")?;
                for (i, b) in eui64.iter().enumerate() {
                    if i > 0 {
                        f.write_str("-")?;
                    }
                    write!(f, "{b:02X}")?;
                }
                f.write_str(")")
            }
            DevicePathNode::MacAddress { address, if_type } => {
                // Ethernet (if_type 0 or 1) uses only the first 6 of the 32 bytes.
                let shown = if *if_type <= 1 { 6 } else { address.len() };
                f.write_str("MAC(")?;
                for b in address.iter().take(shown) {
                    write!(f, "{b:02x}")?;
                }
                write!(f, ",{if_type:#x})")
            }
            DevicePathNode::Ipv4(ip) => write!(
                f,
                "IPv4({},{},{},{},{},{})",
                SocketText(ip.remote_address, ip.remote_port),
                Protocol(ip.protocol),
                if ip.static_address != 0 {
                    "Static"
                } else {
                    "DHCP"
                },
                SocketText(ip.local_address, ip.local_port),
                ip.gateway,
                ip.subnet_mask
            ),
            DevicePathNode::Ipv6(ip) => {
                let origin = match ip.address_origin {
                    0 => "Static".to_string(),
                    1 => "StatelessAutoConfigure".to_string(),
                    2 => "StatefulAutoConfigure".to_string(),
                    other => format!("{other:#x}"),
                };
                write!(
                    f,
                    "IPv6({},{},{origin},{},{},{})",
                    Socket6Text(ip.remote_address, ip.remote_port),
                    Protocol(ip.protocol),
                    Socket6Text(ip.local_address, ip.local_port),
                    ip.gateway,
                    ip.prefix_length
                )
            }
            DevicePathNode::Uart(u) => {
                let parity = match u.parity {
                    0 => "D",
                    1 => "N",
                    2 => "E",
                    3 => "O",
                    4 => "M",
                    5 => "S",
                    _ => "x",
                };
                let stop = match u.stop_bits {
                    0 => "D",
                    1 => "1",
                    2 => "1.5",
                    3 => "2",
                    _ => "x",
                };
                write!(f, "Uart({},{},{parity},{stop})", u.baud_rate, u.data_bits)
            }
            DevicePathNode::UsbClass {
                vendor_id,
                product_id,
                class,
                subclass,
                protocol,
            } => write!(
                f,
                "UsbClass({vendor_id:#x},{product_id:#x},{class:#x},{subclass:#x},{protocol:#x})"
            ),
            DevicePathNode::Uri(uri) => write!(f, "Uri({})", String::from_utf8_lossy(uri)),
            DevicePathNode::Vendor(v) => {
                let kind = match v.kind {
                    VendorKind::Hardware => "Hw",
                    VendorKind::Messaging => "Msg",
                    VendorKind::Media => "Media",
                };
                write!(f, "Ven{kind}({}", v.guid)?;
                if !v.data.is_empty() {
                    write!(f, ",{}", Hex(&v.data))?;
                }
                f.write_str(")")
            }
            DevicePathNode::HardDrive(hd) => {
                write!(f, "HD({},", hd.partition_number)?;
                match hd.signature_type {
                    SIGNATURE_TYPE_GUID => write!(f, "GPT,{}", Uuid::from_bytes_le(hd.signature))?,
                    SIGNATURE_TYPE_MBR => {
                        let [a, b, c, d, ..] = hd.signature;
                        write!(f, "MBR,{:#010x}", u32::from_le_bytes([a, b, c, d]))?
                    }
                    other => write!(f, "{other},0")?,
                }
                write!(f, ",{:#x},{:#x})", hd.partition_start, hd.partition_size)
            }
            DevicePathNode::FilePath(path) => write!(f, "File({path})"),
            DevicePathNode::FirmwareFile(guid) => write!(f, "FvFile({guid})"),
            DevicePathNode::FirmwareVolume(guid) => write!(f, "Fv({guid})"),
            DevicePathNode::EndInstance => f.write_str(","),
            DevicePathNode::EndEntire => Ok(()),
            // edk2's generic form for nodes it cannot name.
            DevicePathNode::Raw(raw) => {
                match raw.node_type {
                    TYPE_HARDWARE => write!(f, "HardwarePath({}", raw.subtype)?,
                    TYPE_ACPI => write!(f, "AcpiPath({}", raw.subtype)?,
                    TYPE_MESSAGING => write!(f, "Msg({}", raw.subtype)?,
                    TYPE_MEDIA => write!(f, "MediaPath({}", raw.subtype)?,
                    TYPE_BBS => write!(f, "BbsPath({}", raw.subtype)?,
                    other => write!(f, "Path({other},{}", raw.subtype)?,
                }
                if !raw.data.is_empty() {
                    write!(f, ",{}", Hex(&raw.data))?;
                }
                f.write_str(")")
            }
        }
    }
}

/// edk2's names for the EISA ids it knows.
fn fmt_acpi(f: &mut fmt::Formatter<'_>, hid: u32, uid: u32) -> fmt::Result {
    // The low 16 bits 0x41d0 are the compressed vendor "PNP"; the high 16 are the product.
    if hid & 0xffff == 0x41d0 {
        let product = hid >> 16;
        match product {
            0x0a03 => write!(f, "PciRoot({uid:#x})"),
            0x0a08 => write!(f, "PcieRoot({uid:#x})"),
            0x0604 => write!(f, "Floppy({uid:#x})"),
            0x0301 => write!(f, "Keyboard({uid:#x})"),
            0x0501 => write!(f, "Serial({uid:#x})"),
            0x0401 => write!(f, "ParallelPort({uid:#x})"),
            _ => write!(f, "Acpi(PNP{product:04X},{uid:#x})"),
        }
    } else {
        write!(f, "Acpi({hid:#010x},{uid:#x})")
    }
}

struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

struct Protocol(u16);

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            6 => f.write_str("TCP"),
            17 => f.write_str("UDP"),
            other => write!(f, "{other:#x}"),
        }
    }
}

/// An IPv4 address with its port, the port omitted when 0 (libefivar's form).
struct SocketText(Ipv4Addr, u16);

impl fmt::Display for SocketText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            0 => write!(f, "{}", self.0),
            port => write!(f, "{}:{port}", self.0),
        }
    }
}

/// An IPv6 address with its port, bracketed only when a port is shown.
struct Socket6Text(Ipv6Addr, u16);

impl fmt::Display for Socket6Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            0 => write!(f, "{}", self.0),
            port => write!(f, "[{}]:{port}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(node_type: u8, subtype: u8, data: &[u8]) -> Vec<u8> {
        let mut out = vec![node_type, subtype];
        out.extend(u16::try_from(data.len() + 4).unwrap().to_le_bytes());
        out.extend(data);
        out
    }

    #[test]
    fn pci_root_pci_nvme_prints_like_ovmf() {
        let mut bytes = node(TYPE_ACPI, ACPI_HID, &[0xd0, 0x41, 0x03, 0x0a, 0, 0, 0, 0]);
        bytes.extend(node(TYPE_HARDWARE, HW_PCI, &[0x00, 0x04]));
        bytes.extend(node(
            TYPE_MESSAGING,
            MSG_NVME,
            &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ));
        bytes.extend(node(TYPE_END, END_ENTIRE, &[]));
        let path = DevicePath::decode(&bytes).unwrap();
        assert_eq!(
            path.to_string(),
            "PciRoot(0x0)/Pci(0x4,0x0)/NVMe(0x1,00-00-00-00-00-00-00-00)"
        );
        assert_eq!(path.encode().unwrap(), bytes);
    }

    #[test]
    fn known_node_with_extra_byte_stays_raw_and_round_trips() {
        let bytes = node(TYPE_HARDWARE, HW_PCI, &[0, 4, 9]);
        let path = DevicePath::decode(&bytes).unwrap();
        assert!(matches!(path.nodes.as_slice(), [DevicePathNode::Raw(_)]));
        assert_eq!(path.encode().unwrap(), bytes);
    }

    #[test]
    fn file_path_with_odd_length_stays_raw() {
        let bytes = node(TYPE_MEDIA, MEDIA_FILE_PATH, &[b'\\', 0, 0, 0, 7]);
        let path = DevicePath::decode(&bytes).unwrap();
        assert!(matches!(path.nodes.as_slice(), [DevicePathNode::Raw(_)]));
        assert_eq!(path.encode().unwrap(), bytes);
    }

    #[test]
    fn file_path_with_interior_nul_stays_raw() {
        let bytes = node(TYPE_MEDIA, MEDIA_FILE_PATH, &[b'a', 0, 0, 0, b'b', 0, 0, 0]);
        let path = DevicePath::decode(&bytes).unwrap();
        assert!(matches!(path.nodes.as_slice(), [DevicePathNode::Raw(_)]));
        assert_eq!(path.encode().unwrap(), bytes);
    }

    #[test]
    fn node_length_below_header_is_an_error_not_a_loop() {
        for length in [0u8, 1, 2, 3] {
            let bytes = [TYPE_MEDIA, MEDIA_FILE_PATH, length, 0];
            assert_eq!(
                DevicePath::decode(&bytes),
                Err(DevicePathError::LengthTooSmall {
                    offset: 0,
                    length: length.into()
                })
            );
        }
    }

    #[test]
    fn node_length_past_the_end_is_an_error() {
        let bytes = [TYPE_END, END_ENTIRE, 0xff, 0xff];
        assert_eq!(
            DevicePath::decode(&bytes),
            Err(DevicePathError::Overrun {
                offset: 0,
                length: 0xffff,
                remaining: 4
            })
        );
    }

    #[test]
    fn trailing_bytes_shorter_than_a_header_are_an_error() {
        let mut bytes = node(TYPE_END, END_ENTIRE, &[]);
        bytes.extend([1, 2]);
        assert_eq!(
            DevicePath::decode(&bytes),
            Err(DevicePathError::TruncatedHeader {
                offset: 4,
                remaining: 2
            })
        );
    }

    #[test]
    fn file_path_with_nul_refuses_to_encode() {
        let path = DevicePath {
            nodes: vec![DevicePathNode::FilePath("a\0b".into())],
        };
        assert!(matches!(
            path.encode(),
            Err(DevicePathError::NulInFilePath { .. })
        ));
    }

    #[test]
    fn oversized_uri_refuses_to_encode() {
        let path = DevicePath {
            nodes: vec![DevicePathNode::Uri(vec![b'x'; 70_000])],
        };
        assert!(matches!(
            path.encode(),
            Err(DevicePathError::NodeTooLong { len: 70_004, .. })
        ));
    }

    #[test]
    fn mbr_hard_drive_prints_its_signature() {
        let mut signature = [0u8; 16];
        signature[..4].copy_from_slice(&0x1234_abcdu32.to_le_bytes());
        let hd = DevicePathNode::HardDrive(HardDrive {
            partition_number: 2,
            partition_start: 0x800,
            partition_size: 0x1000,
            signature,
            partition_format: 1,
            signature_type: SIGNATURE_TYPE_MBR,
        });
        assert_eq!(hd.to_string(), "HD(2,MBR,0x1234abcd,0x800,0x1000)");
    }

    #[test]
    fn unknown_node_prints_edk2_generic_form() {
        let bytes = node(TYPE_MESSAGING, 0x7e, &[0xab, 0x01]);
        let path = DevicePath::decode(&bytes).unwrap();
        assert_eq!(path.to_string(), "Msg(126,ab01)");
    }

    #[test]
    fn multi_instance_path_prints_comma_between_instances() {
        let mut bytes = node(TYPE_ACPI, ACPI_HID, &[0xd0, 0x41, 0x03, 0x0a, 0, 0, 0, 0]);
        bytes.extend(node(TYPE_END, END_INSTANCE, &[]));
        bytes.extend(node(
            TYPE_ACPI,
            ACPI_HID,
            &[0xd0, 0x41, 0x01, 0x05, 1, 0, 0, 0],
        ));
        bytes.extend(node(TYPE_END, END_ENTIRE, &[]));
        let path = DevicePath::decode(&bytes).unwrap();
        assert_eq!(path.to_string(), "PciRoot(0x0),Serial(0x1)");
        assert_eq!(path.encode().unwrap(), bytes);
    }
}
