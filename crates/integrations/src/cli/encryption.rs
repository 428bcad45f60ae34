//! `integrations generate-key` and `integrations rotate-keys`.

use std::process::ExitCode;

use clap::Args;
use db_pool::Pool;

use super::embedded::Target;
use super::DatabaseArgs;
use crate::crypto::{Keyring, KEYS_ENV};
use crate::oauth::{TokenClient, TokenClientConfig};
use crate::service::IntegrationsService;
use crate::settings::{process_env, ServiceSettings};

/// Options of `integrations generate-key`.
#[derive(Debug, Args)]
pub struct GenerateKeyArgs {
    /// The new key's id (letters, digits, - or _); by default the date and a
    /// random suffix (k20261205-3f9a), so keys generated for a rotation
    /// never share an id.
    #[arg(long)]
    id: Option<String>,
}

/// A key id unlikely to repeat: today's date and 16 random bits.
fn default_key_id() -> String {
    format!(
        "k{}-{:04x}",
        chrono::Utc::now().format("%Y%m%d"),
        rand::random::<u16>()
    )
}

/// Prints a new `id:base64key`, alone on the line, for
/// `INTEGRATIONS_ENCRYPTION_KEYS`.
pub fn generate(args: GenerateKeyArgs) -> ExitCode {
    let id = args.id.unwrap_or_else(default_key_id);
    let spec = Keyring::generate_spec(&id);
    if let Err(e) = Keyring::parse(&spec) {
        eprintln!("{e}");
        return ExitCode::from(super::EXIT_INVALID_INPUT);
    }
    eprintln!("put it first in {KEYS_ENV} (keep the old keys after it until rotate-keys has run):");
    println!("{spec}");
    ExitCode::SUCCESS
}

/// Options of `integrations rotate-keys`.
#[derive(Debug, Args)]
pub struct RotateKeysArgs {
    #[command(flatten)]
    db: DatabaseArgs,

    /// Rows re-encrypted per transaction.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    batch: i64,
}

/// Re-encrypts every token with the first key of
/// `INTEGRATIONS_ENCRYPTION_KEYS`, in batches; safe to interrupt and rerun.
pub fn rotate(args: RotateKeysArgs) -> ExitCode {
    let target = match Target::of(&args.db) {
        Ok(target) => target,
        Err(code) => return code,
    };
    let settings = match ServiceSettings::from_env(&process_env) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(super::EXIT_INVALID_INPUT);
        }
    };
    // The development key beside the embedded database, unless keys are set.
    let keys = match (&target, &settings.encryption_keys) {
        (Target::Embedded { data_dir, .. }, None) => {
            super::embedded::development_keyring(data_dir).map_err(|e| format!("error: {e:#}"))
        }
        _ => settings.keyring().map_err(|e| e.to_string()),
    };
    let keys = match keys {
        Ok(k) => k,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(super::EXIT_INVALID_INPUT);
        }
    };
    super::block_on(target.run(|cfg, _| async move {
        let result = async {
            let pool = Pool::new(cfg)?;
            crate::store::migrations::run(&pool).await?;
            let providers = settings.providers(&process_env)?;
            let current = keys.current_id().to_string();
            let service = IntegrationsService::new(
                pool.clone(),
                keys,
                providers,
                TokenClient::new(&TokenClientConfig::default())?,
                settings.service.clone(),
            );
            let bar = super::progress::Progress::bar(0, "rows");
            let report = service
                .rotate_keys_reporting(args.batch, |report, total| {
                    bar.set_length(total);
                    bar.set(report.reencrypted + report.unreadable);
                })
                .await?;
            bar.finish();
            pool.close(std::time::Duration::from_secs(5)).await;
            Ok::<_, anyhow::Error>((report, current))
        }
        .await;
        match result {
            Ok((report, current))
                if report.unreadable == 0 && report.webhook_secrets_unreadable == 0 =>
            {
                println!(
                    "re-encrypted {} integration(s) with key '{current}' in {} batch(es), {} connect flow(s) in progress{} and {} webhook secret(s); older keys can now be removed",
                    report.reencrypted,
                    report.batches,
                    report.flows_reencrypted,
                    dropped(report.flows_dropped),
                    report.webhook_secrets_reencrypted,
                );
                ExitCode::SUCCESS
            }
            Ok((report, current)) => {
                println!(
                    "re-encrypted {} integration(s) with key '{current}' in {} batch(es), {} connect flow(s) in progress{} and {} webhook secret(s)",
                    report.reencrypted,
                    report.batches,
                    report.flows_reencrypted,
                    dropped(report.flows_dropped),
                    report.webhook_secrets_reencrypted,
                );
                if report.webhook_secrets_unreadable > 0 {
                    eprintln!(
                        "error: {} webhook secret(s) could not be decrypted and were left as they are; their deliveries wait\n\
                         hint: keep their key in INTEGRATIONS_ENCRYPTION_KEYS, or POST /v1/webhooks/{{id}}/rotate-secret for each and give the receivers the new secret",
                        report.webhook_secrets_unreadable
                    );
                }
                if report.unreadable > 0 {
                    let ids: Vec<String> =
                        report.unreadable_ids.iter().map(i64::to_string).collect();
                    let more = if report.unreadable > ids.len() as u64 {
                        ", ..."
                    } else {
                        ""
                    };
                    eprintln!(
                        "error: {} integration(s) could not be decrypted and were left as they are (ids {}{more}): {}\n\
                         hint: keep their key in INTEGRATIONS_ENCRYPTION_KEYS; reconnect or delete those integrations, then run rotate-keys again",
                        report.unreadable,
                        ids.join(", "),
                        report.first_failure.as_deref().unwrap_or("unknown failure"),
                    );
                }
                ExitCode::FAILURE
            }
            Err(e) => super::report_failure(&e),
        }
    }))
}

/// The flows a rotation dropped, when any.
fn dropped(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} unreadable connect flow(s) dropped: those users start again)")
    }
}
