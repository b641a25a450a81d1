//! Nodes: registration and heartbeats, and their credentials.

use super::*;

pub(super) fn upsert_node(store: &PostgresStore, spec: &NodeSpec) -> Result<Node, StoreError> {
    if spec.id.is_empty() {
        return Err(ModelError::Empty { what: "node id" }.into());
    }
    store.write(Commit::Relaxed, |db, now| {
        let node = Node {
            spec: spec.clone(),
            last_heartbeat: now,
        };
        db.execute(
            "INSERT INTO nodes (id, last_heartbeat, body) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET last_heartbeat = excluded.last_heartbeat,
                                            body = excluded.body",
            &[&spec.id, &millis_sql(now), &serde_json::to_string(&node)?],
        )?;
        Ok(node)
    })
}

pub(super) fn list_nodes(store: &PostgresStore) -> Result<Vec<Node>, StoreError> {
    store.read(|db| {
        db.query("SELECT body FROM nodes ORDER BY id", &[])?
            .iter()
            .map(|r| parse(r.get::<_, &str>(0)))
            .collect()
    })
}

pub(super) fn add_node_credential(
    store: &PostgresStore,
    node: &str,
    token_sha256: &str,
) -> Result<(), StoreError> {
    transitions::check_credential(node, token_sha256)?;
    store.write(Commit::Synced, |db, now| {
        db.execute(
            "INSERT INTO node_credentials (token_sha256, node, created_at) VALUES ($1, $2, $3)",
            &[&token_sha256, &node, &millis_sql(now)],
        )?;
        Ok(())
    })
}

pub(super) fn revoke_node_credentials(
    store: &PostgresStore,
    node: &str,
) -> Result<usize, StoreError> {
    store.write(Commit::Synced, |db, _| {
        let n = db.execute("DELETE FROM node_credentials WHERE node = $1", &[&node])?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    })
}

pub(super) fn node_credentials(store: &PostgresStore) -> Result<Vec<(String, NodeId)>, StoreError> {
    store.read(|db| {
        Ok(db
            .query(
                "SELECT token_sha256, node FROM node_credentials ORDER BY token_sha256",
                &[],
            )?
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect())
    })
}
