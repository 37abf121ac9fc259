//! One module per subcommand.

pub mod apply;
pub mod bootchart;
pub mod cluster;
pub mod config;
pub mod containers;
pub mod debug;
pub mod etcd;
pub mod events;
pub mod gen;
pub mod health;
pub mod image;
pub mod images;
pub mod logs;
pub mod power;
pub mod reset;
pub mod rollout;
pub mod services;
pub mod status;
pub mod upgrade;
pub mod version;
