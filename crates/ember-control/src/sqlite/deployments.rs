//! Deployments: create, get, list, delete.

use super::*;

pub(super) fn load_deployment(
    conn: &Connection,
    name: &str,
) -> Result<Option<Deployment>, StoreError> {
    let body: Option<String> = conn
        .prepare_cached("SELECT body FROM deployments WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?;
    body.map(|b| serde_json::from_str(&b).map_err(StoreError::from))
        .transpose()
}

pub(super) fn create_deployment(
    store: &SqliteStore,
    spec: &DeploymentSpec,
) -> Result<Deployment, StoreError> {
    spec.validate()?;
    store.write(Commit::Synced, |tx, now| {
        if load_deployment(tx, &spec.name)?.is_some() {
            return Err(StoreError::DeploymentExists(spec.name.clone()));
        }
        let d = Deployment {
            spec: spec.clone(),
            created_at: now,
        };
        tx.prepare_cached("INSERT INTO deployments (name, created_at, body) VALUES (?1, ?2, ?3)")?
            .execute(params![
                d.spec.name,
                millis_sql(now),
                serde_json::to_string(&d)?
            ])?;
        Ok(d)
    })
}

pub(super) fn get_deployment(
    store: &SqliteStore,
    name: &str,
) -> Result<Option<Deployment>, StoreError> {
    let conn = store.lock()?;
    load_deployment(&conn, name)
}

pub(super) fn list_deployments(store: &SqliteStore) -> Result<Vec<Deployment>, StoreError> {
    let conn = store.lock()?;
    let mut stmt = conn.prepare_cached("SELECT body FROM deployments ORDER BY name")?;
    let bodies = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    bodies
        .iter()
        .map(|b| serde_json::from_str(b).map_err(StoreError::from))
        .collect()
}

pub(super) fn delete_deployment(store: &SqliteStore, name: &str) -> Result<Deployment, StoreError> {
    store.write(Commit::Synced, |tx, _| {
        let d = load_deployment(tx, name)?
            .ok_or_else(|| StoreError::DeploymentNotFound(name.to_owned()))?;
        tx.prepare_cached("DELETE FROM deployments WHERE name = ?1")?
            .execute([name])?;
        Ok(d)
    })
}
