//! Nodes: registration and heartbeats, and their credentials.

use super::*;

pub(super) fn upsert_node(store: &SqliteStore, spec: &NodeSpec) -> Result<Node, StoreError> {
    if spec.id.is_empty() {
        return Err(ModelError::Empty { what: "node id" }.into());
    }
    store.write(Commit::Relaxed, |tx, now| {
        let node = Node {
            spec: spec.clone(),
            last_heartbeat: now,
        };
        tx.prepare_cached(
            "INSERT INTO nodes (id, last_heartbeat, body) VALUES (?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET last_heartbeat = excluded.last_heartbeat,
                                            body = excluded.body",
        )?
        .execute(params![
            spec.id,
            millis_sql(now),
            serde_json::to_string(&node)?
        ])?;
        Ok(node)
    })
}

pub(super) fn list_nodes(store: &SqliteStore) -> Result<Vec<Node>, StoreError> {
    let conn = store.lock()?;
    let mut stmt = conn.prepare_cached("SELECT body FROM nodes ORDER BY id")?;
    let bodies = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    bodies
        .iter()
        .map(|b| serde_json::from_str(b).map_err(StoreError::from))
        .collect()
}

pub(super) fn add_node_credential(
    store: &SqliteStore,
    node: &str,
    token_sha256: &str,
) -> Result<(), StoreError> {
    transitions::check_credential(node, token_sha256)?;
    store.write(Commit::Synced, |tx, now| {
        tx.prepare_cached(
            "INSERT INTO node_credentials (token_sha256, node, created_at) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![token_sha256, node, millis_sql(now)])?;
        Ok(())
    })
}

pub(super) fn revoke_node_credentials(
    store: &SqliteStore,
    node: &str,
) -> Result<usize, StoreError> {
    store.write(Commit::Synced, |tx, _| {
        Ok(tx
            .prepare_cached("DELETE FROM node_credentials WHERE node = ?1")?
            .execute(params![node])?)
    })
}

pub(super) fn node_credentials(store: &SqliteStore) -> Result<Vec<(String, NodeId)>, StoreError> {
    let conn = store.lock()?;
    let mut stmt = conn
        .prepare_cached("SELECT token_sha256, node FROM node_credentials ORDER BY token_sha256")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}
