//! Deployments: create, get, list, delete.

use super::*;

pub(super) fn create_deployment(
    store: &PostgresStore,
    spec: &DeploymentSpec,
) -> Result<Deployment, StoreError> {
    spec.validate()?;
    store.write(Commit::Synced, |db, now| {
        let d = Deployment {
            spec: spec.clone(),
            created_at: now,
        };
        let inserted = db.execute(
            "INSERT INTO deployments (name, created_at, body) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO NOTHING",
            &[&d.spec.name, &millis_sql(now), &serde_json::to_string(&d)?],
        )?;
        if inserted == 0 {
            return Err(StoreError::DeploymentExists(spec.name.clone()));
        }
        Ok(d)
    })
}

pub(super) fn get_deployment(
    store: &PostgresStore,
    name: &str,
) -> Result<Option<Deployment>, StoreError> {
    store.read(|db| db.load_deployment(name))
}

pub(super) fn list_deployments(store: &PostgresStore) -> Result<Vec<Deployment>, StoreError> {
    store.read(|db| {
        db.query("SELECT body FROM deployments ORDER BY name", &[])?
            .iter()
            .map(|r| parse(r.get::<_, &str>(0)))
            .collect()
    })
}

pub(super) fn delete_deployment(
    store: &PostgresStore,
    name: &str,
) -> Result<Deployment, StoreError> {
    store.write(Commit::Synced, |db, _| {
        let row = db.query_opt(
            "DELETE FROM deployments WHERE name = $1 RETURNING body",
            &[&name],
        )?;
        match row {
            Some(r) => parse(r.get::<_, &str>(0)),
            None => Err(StoreError::DeploymentNotFound(name.to_owned())),
        }
    })
}
