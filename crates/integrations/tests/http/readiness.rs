//! `/readyz` follows the database: 503 while it is down, 200 again once it
//! is back, without restarting the service.

use std::time::Duration;

use pg_cluster::{ClusterOptions, LocalCluster};

use crate::common::{eventually, TestApp};

#[tokio::test]
async fn readyz_is_503_while_the_database_is_down_and_200_once_it_is_back() {
    let mut cluster = LocalCluster::start_temporary(ClusterOptions::default())
        .await
        .unwrap();
    let url = format!(
        "{}?sslmode=disable&connect_timeout=1&pool_timeout=1",
        cluster.url("postgres")
    );
    let app = TestApp::spawn_on(&url, None, &[]).await;
    let ready = app.get("/readyz", None).await;
    assert_eq!(ready.status, 200, "{}", ready.text);

    cluster.stop().await.unwrap();
    // The first check after the stop may still find a pooled connection
    // that has not noticed; within a few seconds it must be 503.
    let seen = std::sync::Mutex::new(Vec::new());
    let down = eventually(Duration::from_secs(15), || async {
        let r = app.get("/readyz", None).await;
        seen.lock().unwrap().push(r.status.as_u16());
        (r.status == 503).then_some(r)
    })
    .await
    .expect("/readyz did not turn 503 with the database stopped");
    // Never a 500 on the way down.
    let seen = seen.into_inner().unwrap();
    assert!(seen.iter().all(|s| [200, 503].contains(s)), "{seen:?}");
    let code = down.json()["error"]["code"].as_str().unwrap().to_string();
    down.assert_error(503, &code);
    assert!(
        ["P1001", "P1017", "P2024", "not_ready"].contains(&code.as_str()),
        "{}",
        down.text
    );
    // The database's address stays in the logs: an API error names the
    // code, not where the database is.
    let unreachable = eventually(Duration::from_secs(15), || async {
        let r = app
            .get("/v1/users/user-1/integrations", Some(&app.keys.read))
            .await;
        (r.status == 503 && r.json()["error"]["code"] == "P1001").then_some(r)
    })
    .await
    .expect("no P1001 answer with the database stopped");
    let port = cluster.port().to_string();
    assert!(
        !unreachable.text.contains(&port) && !unreachable.text.contains("127.0.0.1"),
        "{}",
        unreachable.text
    );
    // Liveness does not depend on the database.
    assert_eq!(app.get("/healthz", None).await.status, 200);

    cluster.start().await.unwrap();
    let back = eventually(Duration::from_secs(20), || async {
        let r = app.get("/readyz", None).await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert!(
        back.is_some(),
        "/readyz did not return to 200 after the database came back:\n{}",
        app.server.logs().join("\n")
    );
    // And the API works again.
    let list = app
        .get("/v1/users/user-1/integrations", Some(&app.keys.read))
        .await;
    assert_eq!(list.status, 200, "{}", list.text);
    app.assert_no_leaks();
    drop(app);
    drop(cluster);
}
