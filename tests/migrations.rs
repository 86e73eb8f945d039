//! The migration runner on a real PostgreSQL: every applied file's checksum is recorded, an
//! edited migration is refused with its name (never applied on top of), and a database migrated
//! by a binary from before checksums adopts them (issue #19 item 4).

use vantage_ingester::db::{self, migration_checksum, DbError, MIGRATIONS};
use vantage_tests::harness::Run;

async fn checksums(client: &tokio_postgres::Client) -> Vec<(i32, Option<String>)> {
    client
        .query(
            "SELECT version, checksum FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn expected() -> Vec<(i32, Option<String>)> {
    MIGRATIONS
        .iter()
        .map(|&(v, _, sql)| (v, Some(migration_checksum(sql))))
        .collect()
}

#[tokio::test]
async fn edited_migrations_are_refused_and_old_databases_adopt_checksums() {
    let run = Run::new("migrations");
    let schema = run.schema();
    let mut client = run.pg().await;

    let applied = db::migrate(&mut client, &schema).await.unwrap();
    assert_eq!(applied, MIGRATIONS.len());
    assert_eq!(checksums(&client).await, expected());
    assert_eq!(db::migrate(&mut client, &schema).await.unwrap(), 0);

    // As if 0003 had been edited after this database applied it.
    client
        .execute(
            "UPDATE schema_migrations SET checksum = 'abc123' WHERE version = 3",
            &[],
        )
        .await
        .unwrap();
    let err = db::migrate(&mut client, &schema).await.unwrap_err();
    assert!(
        matches!(
            err,
            DbError::MigrationEdited {
                name: "0003_storage.sql",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_transient());
    let message = err.to_string();
    assert!(
        message.contains("0003_storage.sql") && message.contains("abc123"),
        "{message}"
    );

    // A database a binary without checksums migrated: NULL checksums are filled in, not refused.
    client
        .execute("UPDATE schema_migrations SET checksum = NULL", &[])
        .await
        .unwrap();
    assert_eq!(db::migrate(&mut client, &schema).await.unwrap(), 0);
    assert_eq!(checksums(&client).await, expected());

    run.cleanup(&[]).await;
}
