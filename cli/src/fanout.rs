//! `-n/--nodes`: one call to many nodes at once, each over its own connection, with the
//! replies kept in the order the nodes were named and one node's failure reported beside the
//! others' results.

use std::future::Future;

use anyhow::anyhow;
use api::proto::machine_client::MachineClient;
use futures::future::join_all;
use tonic::transport::Channel;

use crate::connect::Target;
use crate::output::Format;

/// One node's answer.
pub struct Reply<T> {
    /// The node's endpoint.
    pub node: String,
    /// What it answered, or why not.
    pub result: anyhow::Result<T>,
}

impl Target {
    /// Whether `-n` named nodes: output then says which node each line is from.
    pub fn fans_out(&self) -> bool {
        !self.nodes.is_empty()
    }

    /// Calls `call` on every node `-n` names, all at once (or on the context's node when `-n`
    /// is not given). A node that cannot be reached is a failed reply, not an early return.
    pub async fn each<T, F, Fut>(&self, call: F) -> anyhow::Result<Vec<Reply<T>>>
    where
        F: Fn(String, MachineClient<Channel>) -> Fut,
        Fut: Future<Output = anyhow::Result<T>>,
    {
        if !self.fans_out() {
            let (endpoint, client) = self.connect().await?;
            let result = call(endpoint.clone(), client).await;
            return Ok(vec![Reply {
                node: endpoint,
                result,
            }]);
        }
        let ctx = self.context()?;
        let calls = self.nodes.iter().map(|node| {
            let (ctx, call) = (&ctx, &call);
            async move {
                let result = match api::client::connect_context(node, ctx).await {
                    Ok(client) => call(node.clone(), client).await,
                    Err(e) => Err(anyhow!("{node}: {e}")),
                };
                Reply {
                    node: node.clone(),
                    result,
                }
            }
        });
        Ok(join_all(calls).await)
    }
}

/// The NODE column's heading, as wide as [`node_column`].
pub const NODE_HEADER: &str = "NODE                  ";

/// A table row's NODE column when `-n` is in use, else nothing.
pub fn node_column(endpoint: &str, many: bool) -> String {
    if many {
        format!("{endpoint:<21} ")
    } else {
        String::new()
    }
}

/// How a command shows one node's reply.
pub struct Show<J, H, R> {
    /// Its JSON document (given the node's endpoint).
    pub json: J,
    /// With `-n`, the output is an array with an object per node: `node` (its endpoint) and
    /// the node's document under this key, or `error`.
    pub key: &'static str,
    /// The text's header, printed once (given whether a NODE column is wanted).
    pub header: H,
    /// Its text, given the node's endpoint and whether `-n` is in use (a NODE column or
    /// heading).
    pub render: R,
}

/// Prints what succeeded, then each failure on stderr; fails if any node did. Without `-n`
/// the output is the single node's, as it always was.
pub fn print<T, J, H, R>(
    target: &Target,
    replies: Vec<Reply<T>>,
    format: Format,
    show: Show<J, H, R>,
) -> anyhow::Result<()>
where
    J: Fn(&str, &T) -> serde_json::Value,
    H: Fn(bool),
    R: Fn(&str, bool, &T),
{
    let Show {
        json,
        key,
        header,
        render,
    } = show;
    if !target.fans_out() {
        for r in replies {
            let v = r.result?;
            match format {
                Format::Json => println!("{}", json(&r.node, &v)),
                Format::Text => {
                    header(false);
                    render(&r.node, false, &v);
                }
            }
        }
        return Ok(());
    }
    if format == Format::Text && replies.iter().any(|r| r.result.is_ok()) {
        header(true);
    }
    let total = replies.len();
    let mut failed = Vec::new();
    let mut docs = Vec::new();
    for r in replies {
        match (&r.result, format) {
            (Ok(v), Format::Json) => {
                docs.push(serde_json::json!({ "node": r.node, key: json(&r.node, v) }));
            }
            (Ok(v), Format::Text) => render(&r.node, true, v),
            (Err(e), Format::Json) => {
                docs.push(serde_json::json!({ "node": r.node, "error": format!("{e:#}") }));
                failed.push(r.node);
            }
            (Err(e), Format::Text) => {
                eprintln!("error: {e:#}");
                failed.push(r.node);
            }
        }
    }
    if format == Format::Json {
        println!("{}", serde_json::Value::Array(docs));
    }
    outcome(&failed, total)
}

/// The end of a streaming command over `-n` (its lines already printed, each with its node):
/// each failure on stderr; fails if any node did.
pub fn report(replies: Vec<Reply<()>>) -> anyhow::Result<()> {
    let total = replies.len();
    let failed: Vec<String> = replies
        .into_iter()
        .filter_map(|r| match r.result {
            Ok(()) => None,
            Err(e) => {
                eprintln!("error: {e:#}");
                Some(r.node)
            }
        })
        .collect();
    outcome(&failed, total)
}

/// `-n` for a command that starts something on every node (a sequence with an actor id):
/// all asked at once, a line each with the node and the actor; fails if any node refused.
pub async fn actions<F, Fut>(target: &Target, call: F) -> anyhow::Result<()>
where
    F: Fn(String, MachineClient<Channel>) -> Fut,
    Fut: Future<Output = anyhow::Result<String>>,
{
    let replies = target.each(call).await?;
    let show = Show {
        json: |_: &str, actor: &String| serde_json::json!({ "actor_id": actor }),
        key: "started",
        header: |many: bool| println!("{}ACTOR", if many { NODE_HEADER } else { "" }),
        render: |endpoint: &str, many: bool, actor: &String| {
            println!("{}{actor}", node_column(endpoint, many));
        },
    };
    print(target, replies, Format::Text, show)
}

/// `-n` for a command that prints a document per node: each under a `# NODE` line, in the
/// order named; fails if any node did.
pub async fn documents<F, Fut>(target: &Target, call: F) -> anyhow::Result<()>
where
    F: Fn(String, MachineClient<Channel>) -> Fut,
    Fut: Future<Output = anyhow::Result<String>>,
{
    let many = target.fans_out();
    let mut replies = target.each(call).await?;
    if !many {
        let text = replies.remove(0).result?;
        print!("{text}");
        return Ok(());
    }
    for r in &replies {
        if let Ok(text) = &r.result {
            println!("# {}", r.node);
            print!("{text}");
        }
    }
    report(
        replies
            .into_iter()
            .map(|r| Reply {
                node: r.node,
                result: r.result.map(drop),
            })
            .collect(),
    )
}

/// `-n` for a command that talks to one node at a length (a patch and its diff, an upload
/// with its progress bar): the nodes one after the other, each under a `# NODE` line, every
/// node tried whatever the one before did; fails if any did.
pub async fn one_by_one<F, Fut>(target: &Target, run: F) -> anyhow::Result<()>
where
    F: Fn(Target) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut replies = Vec::new();
    for node in &target.nodes {
        println!("# {node}");
        let one = Target {
            endpoints: vec![node.clone()],
            nodes: Vec::new(),
            ..target.clone()
        };
        let result = run(one).await.map_err(|e| e.context(node.clone()));
        replies.push(Reply {
            node: node.clone(),
            result,
        });
    }
    report(replies)
}

/// Ok, or which of `total` nodes failed.
fn outcome(failed: &[String], total: usize) -> anyhow::Result<()> {
    if failed.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(
            "{} of {total} nodes failed: {}",
            failed.len(),
            failed.join(", ")
        ))
    }
}
