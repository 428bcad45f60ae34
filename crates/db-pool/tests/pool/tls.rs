//! sslmode and the certificate parameters against a private server with a
//! certificate signed by a test CA, issued for the name `localhost`.

use std::path::PathBuf;

use db_pool::testing::TestDatabase;
use pg_cluster::{ClusterOptions, LocalCluster};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

use crate::common::{pool, pool_url};

struct TlsServer {
    cluster: LocalCluster,
    ca_file: PathBuf,
    other_ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

fn ca() -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

async fn tls_server() -> TlsServer {
    let (ca_pem, issuer) = ca();
    let (other_ca_pem, _) = ca();
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();

    let mut cluster = LocalCluster::start_temporary(ClusterOptions::default())
        .await
        .unwrap();
    cluster
        .write_data_file("server.crt", server_cert.pem(), 0o600)
        .unwrap();
    cluster
        .write_data_file("server.key", server_key.serialize_pem(), 0o600)
        .unwrap();
    cluster.set_setting("ssl", "on");
    cluster.restart().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    let other_ca_file = dir.path().join("other-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    std::fs::write(&other_ca_file, other_ca_pem).unwrap();
    TlsServer {
        cluster,
        ca_file,
        other_ca_file,
        _dir: dir,
    }
}

impl TlsServer {
    fn url(&self, host: &str, params: &str) -> String {
        format!(
            "postgresql://postgres@{host}:{}/postgres?{params}",
            self.cluster.port()
        )
    }
}

/// Whether the pool's connection is encrypted, as the server reports it.
/// Asked three times: the first prepares the statement, the others run it
/// on the socket directly (through the TLS stream when encrypted).
async fn encrypted(url: &str) -> Result<bool, db_pool::Error> {
    let pool = pool_url(url);
    let mut conn = pool.get().await?;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(
            conn.query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await?
            .get::<_, bool>(0),
        );
    }
    assert!(seen.iter().all(|s| *s == seen[0]), "{seen:?}");
    Ok(seen[0])
}

#[tokio::test]
async fn sslmode_policies_against_a_tls_server() {
    let server = tls_server().await;
    let ca = server.ca_file.display().to_string();
    let other = server.other_ca_file.display().to_string();

    assert!(encrypted(&server.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}")
    ))
    .await
    .unwrap());
    // Prisma's spelling of the trusted certificate works too.
    assert!(
        encrypted(&server.url("localhost", &format!("sslmode=verify-full&sslcert={ca}")))
            .await
            .unwrap()
    );
    assert!(encrypted(&server.url("127.0.0.1", "sslmode=prefer"))
        .await
        .unwrap());
    assert!(encrypted(&server.url("127.0.0.1", "sslmode=require"))
        .await
        .unwrap());
    assert!(!encrypted(&server.url("127.0.0.1", "sslmode=disable"))
        .await
        .unwrap());

    // The certificate names localhost, not 127.0.0.1: verify-full refuses,
    // verify-ca (chain only) accepts.
    let err = encrypted(&server.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .unwrap_err();
    assert_eq!(err.code(), "P1011", "{err}");
    assert!(
        encrypted(&server.url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}")))
            .await
            .unwrap()
    );

    // Signed by a CA we do not trust.
    let err = encrypted(&server.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={other}"),
    ))
    .await
    .unwrap_err();
    assert_eq!(err.code(), "P1011", "{err}");
    // verify-ca checks the chain too: an untrusted CA is refused even
    // where the name is not checked.
    let err = encrypted(&server.url(
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={other}"),
    ))
    .await
    .unwrap_err();
    assert_eq!(err.code(), "P1011", "{err}");
    // ... unless the user explicitly accepts invalid certificates.
    assert!(encrypted(&server.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={other}&sslaccept=accept_invalid_certs")
    ))
    .await
    .unwrap());
}

#[tokio::test]
async fn require_refuses_a_server_without_tls() {
    let db = TestDatabase::create().await; // the shared test server has TLS off
    let (strict, _) = pool(&db, "sslmode=require");
    let err = strict.get().await.err().unwrap();
    assert_eq!(err.code(), "P1011", "{err}");
    let (lenient, _) = pool(&db, "sslmode=prefer");
    lenient
        .get()
        .await
        .unwrap()
        .query("SELECT 1", &[])
        .await
        .unwrap();
}

#[tokio::test]
async fn unreadable_root_certificate_is_a_clear_error() {
    let err = db_pool::Pool::new(
        db_pool::PoolConfig::parse(
            "postgresql://localhost/db?sslmode=verify-full&sslrootcert=/no/such/ca.pem",
        )
        .unwrap(),
    )
    .err()
    .unwrap();
    assert_eq!(err.code(), "P1011");
    assert!(err.to_string().contains("/no/such/ca.pem"), "{err}");
}

/// `sslidentity`: a server that admits a role only with a client
/// certificate signed by its CA (`cert` authentication) admits the pool
/// presenting one, and refuses it without one or with one from another CA.
#[tokio::test]
async fn sslidentity_presents_a_client_certificate_the_server_requires() {
    let (ca_pem, issuer) = ca();
    let (_, other_issuer) = ca();
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let client_identity = |issuer: &Issuer<'static, KeyPair>| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "certuser");
        let cert = params.signed_by(&key, issuer).unwrap();
        format!("{}{}", cert.pem(), key.serialize_pem())
    };

    let mut cluster = LocalCluster::start_temporary(ClusterOptions::default())
        .await
        .unwrap();
    let admin = crate::common::admin(&cluster).await;
    admin
        .batch_execute("CREATE ROLE certuser LOGIN")
        .await
        .unwrap();
    drop(admin);
    for (name, contents) in [
        ("server.crt", server_cert.pem()),
        ("server.key", server_key.serialize_pem()),
        ("root.crt", ca_pem.clone()),
        (
            "pg_hba.conf",
            "hostssl all certuser 127.0.0.1/32 cert\n\
             host all certuser 127.0.0.1/32 reject\n\
             host all all 127.0.0.1/32 trust\n\
             local all all trust\n"
                .to_string(),
        ),
    ] {
        cluster.write_data_file(name, contents, 0o600).unwrap();
    }
    cluster.set_setting("ssl", "on");
    cluster.set_setting("ssl_ca_file", "root.crt");
    cluster.restart().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let good = dir.path().join("client.pem");
    std::fs::write(&good, client_identity(&issuer)).unwrap();
    let foreign = dir.path().join("foreign.pem");
    std::fs::write(&foreign, client_identity(&other_issuer)).unwrap();
    let url = |extra: &str| {
        format!(
            "postgresql://certuser@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}&connect_timeout=5{extra}",
            cluster.port(),
            ca_file.display()
        )
    };

    assert!(encrypted(&url(&format!("&sslidentity={}", good.display())))
        .await
        .unwrap());
    let without = encrypted(&url("")).await.unwrap_err();
    assert_eq!(without.code(), "P1000", "{without}");
    let foreign = encrypted(&url(&format!("&sslidentity={}", foreign.display())))
        .await
        .unwrap_err();
    // The server ends the handshake with an alert (today reported as
    // P1001 naming the alert).
    assert!(["P1011", "P1001"].contains(&foreign.code()), "{foreign}");
    assert!(foreign.to_string().contains("alert"), "{foreign}");
}
