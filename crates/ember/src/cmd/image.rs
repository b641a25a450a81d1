//! `ember image ...`.

use crate::progress::Progress;
use crate::util::{RegistryArgs, human_bytes};
use anyhow::{Context, bail};
use ember_oci::Reference;
use ember_registry::{PushBlob, PushReport};
use ember_store::{ImportOptions, ImportPlan, ImportReport, ImportSource, Store};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Exit status of an import whose `--push` failed: the image is imported
/// (and stays so), only the push did not happen. 125 stays "ember failed".
pub const EXIT_PUSH_FAILED: u8 = 3;

/// Image subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Write an image's flattened filesystem to a directory (whiteouts
    /// applied, ownership and modes kept, hardlinks kept). The image must
    /// be in the store (`ember pull` first).
    Unpack {
        /// Image name or digest.
        #[arg(value_name = "REF")]
        reference: String,
        /// Destination directory (must be empty or missing).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Put an image built here into the store, verified like a pull, with
    /// no registry round trip: an OCI image layout directory, an OCI
    /// archive (`podman save --format oci-archive`, `buildah push
    /// oci-archive:`) or a docker-archive (`podman save --format
    /// docker-archive`, `docker save`), told apart by their contents. A
    /// running `ember node` on this store reports the image within a
    /// second, so runs of it prefer this node.
    #[command(after_help = "Examples:\n  \
podman save --format oci-archive -o app.tar localhost/app:v1 && ember image import app.tar\n  \
ember image import --name 127.0.0.1:5000/app:v1 --push 127.0.0.1:5000/app:v1 ./layout\n\n\
Exit status: 0 imported (and pushed, with --push); 125 not imported (the store \
is unchanged); 3 imported, but the push failed.")]
    Import(ImportArgs),
}

/// `ember image import` flags.
#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// Store the image under this name only, instead of the name(s) the
    /// input records (RepoTags, or the layout's image name annotation);
    /// with several images in the input, picks the one of that name.
    #[arg(long, value_name = "REF")]
    pub name: Option<String>,
    /// After the import is committed and reported, push the image (blobs,
    /// then manifest) to REGISTRY/REPO[:TAG] (the tag defaults to the
    /// imported name's), so other nodes can pull it.
    #[arg(long, value_name = "REGISTRY/REPO[:TAG]")]
    pub push: Option<String>,
    /// Print the result as JSON on stdout (one line for the import, one
    /// more for the push).
    #[arg(long)]
    pub json: bool,
    /// No progress on stderr.
    #[arg(short, long)]
    pub quiet: bool,
    /// syncfs the store before committing the layers (see `ember pull --sync`).
    #[arg(long)]
    pub sync: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// OCI layout directory, OCI archive or docker-archive.
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
}

/// Runs `ember image ...`.
pub async fn run(root: &Path, cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Import(args) => import(root, args).await,
        Command::Unpack { reference, dir } => {
            if dir.exists()
                && std::fs::read_dir(&dir)
                    .with_context(|| format!("reading {}", dir.display()))?
                    .next()
                    .is_some()
            {
                bail!("{} is not empty", dir.display());
            }
            let store =
                Store::open(root).with_context(|| format!("opening store {}", root.display()))?;
            let index = store.read_index()?;
            let image = store.resolve(&index, &reference)?;
            store
                .flatten(&image, &dir)
                .with_context(|| format!("unpacking {reference} into {}", dir.display()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `ember image import`: import, report, then push if asked.
async fn import(root: &Path, args: ImportArgs) -> anyhow::Result<ExitCode> {
    let store = Store::open(root).with_context(|| format!("opening store {}", root.display()))?;
    let opts = ImportOptions {
        name: args.name.clone(),
        platform: args.registry.platform.parse()?,
        durable: args.sync,
        ..Default::default()
    };
    // Checked before the import, so a bad target fails before any work.
    let push_to = args.push.as_deref().map(push_target).transpose()?;
    let path = args.path.clone();
    let progress = Arc::new(Progress::new(args.quiet));
    let (plan, report) = {
        let (store, progress, opts) = (store.clone(), progress.clone(), opts.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<(ImportPlan, ImportReport)> {
            let source = ImportSource::open(&path)?;
            if !args.quiet {
                eprintln!("{}: {}", path.display(), source.format());
            }
            let plan = ImportPlan::read(source, &opts)?;
            let report = ember_store::import::import(&store, &plan, &opts, progress.as_ref())?;
            Ok((plan, report))
        })
        .await
        .context("import task")?
        .with_context(|| format!("importing {}", args.path.display()))?
    };
    let plan = Arc::new(plan);
    progress.finish();
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "imported {} from {} ({}): {} layers, {} new ({}), {}",
            report.names.join(", "),
            args.path.display(),
            report.format,
            report.layers,
            report.layers_imported,
            human_bytes(report.bytes_read),
            report.manifest
        );
    }
    let Some(target) = push_to else {
        return Ok(ExitCode::SUCCESS);
    };
    // The import is committed and reported; from here on a failure only
    // means other nodes cannot pull the image yet.
    let target = match target {
        Some(t) => t,
        None => with_tag_of(args.push.as_deref().unwrap_or_default(), &report.names)?,
    };
    match push(&store, &plan, &target, &args.registry, args.quiet).await {
        Ok(p) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"push": {"target": target.to_string(), "report": p}})
                );
            } else {
                println!(
                    "pushed {target}: {} blobs uploaded ({}), {} already there",
                    p.blobs_pushed,
                    human_bytes(p.bytes_pushed),
                    p.blobs_skipped
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let msg = crate::util::error_chain(&e);
            eprintln!("ember: warning: imported, but pushing to {target} failed: {msg}");
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"push": {"target": target.to_string(), "error": msg}})
                );
            }
            Ok(ExitCode::from(EXIT_PUSH_FAILED))
        }
    }
}

/// The push target: `Some` if it says its tag (or digest), `None` if the
/// tag is to come from the imported name.
fn push_target(t: &str) -> anyhow::Result<Option<Reference>> {
    let r: Reference = t.parse().with_context(|| format!("invalid --push {t:?}"))?;
    if r.digest().is_some() {
        bail!("invalid --push {t:?}: push to a tag (REGISTRY/REPO[:TAG]), not a digest");
    }
    let last = t.rsplit('/').next().unwrap_or(t);
    Ok(last.contains(':').then_some(r))
}

/// `target` with the tag of the first imported name.
fn with_tag_of(target: &str, names: &[String]) -> anyhow::Result<Reference> {
    let tag = names
        .first()
        .and_then(|n| n.parse::<Reference>().ok())
        .and_then(|r| r.tag().map(str::to_string))
        .unwrap_or_else(|| "latest".into());
    Ok(format!("{target}:{tag}").parse()?)
}

/// Pushes the imported image: layers from the input (the store keeps them
/// unpacked only), config and manifest from the store's verified blobs.
async fn push(
    store: &Store,
    plan: &Arc<ImportPlan>,
    target: &Reference,
    registry: &RegistryArgs,
    quiet: bool,
) -> anyhow::Result<PushReport> {
    let client = registry.client()?;
    let (manifest, media_type, _) = plan.manifest();
    let manifest_bytes = bytes::Bytes::from(store.read_blob(manifest)?);
    let (config, _) = plan.config();
    let config_bytes = bytes::Bytes::from(store.read_blob(config)?);
    let mut blobs = Vec::new();
    for (i, l) in plan.layers().into_iter().enumerate() {
        let plan = plan.clone();
        blobs.push(PushBlob {
            digest: l.digest,
            size: l.size,
            open: Arc::new(move || {
                plan.layer_blob(i)
                    .map(|(r, _)| r)
                    .map_err(std::io::Error::other)
            }),
        });
    }
    blobs.push(PushBlob {
        digest: config.clone(),
        size: config_bytes.len() as u64,
        open: Arc::new(move || {
            Ok(Box::new(std::io::Cursor::new(config_bytes.clone()))
                as Box<dyn std::io::Read + Send>)
        }),
    });
    let say = move |d: &ember_oci::Digest, uploaded: bool| {
        if !quiet {
            let what = if uploaded { "pushed" } else { "already there" };
            eprintln!("{}: {what}", d);
        }
    };
    Ok(client
        .push_image(target, &blobs, media_type, manifest_bytes, &say)
        .await?)
}
