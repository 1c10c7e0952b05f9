//! Two-factor login and password changes, on shard 0 with the users: each check that must
//! not race is made by the statement that records it.

use async_trait::async_trait;

use super::writer::{Done, Op};
use super::{Fail, PostgresStore, digest};
use crate::clock::now_ms;
use crate::store::{DeletedAccount, Result, Security, StoreError, TokenHash, TwoFactor};

#[async_trait]
impl Security for PostgresStore {
    async fn two_factor(&self, user_id: i64) -> Result<Option<TwoFactor>> {
        let c = self.inner.conn(0).await?;
        let row = c
            .query_opt(
                "SELECT secret, enabled, last_step,
                        (SELECT count(*) FROM recovery_codes WHERE user_id = $1)
                 FROM two_factor WHERE user_id = $1",
                &[&user_id],
            )
            .await
            .map_err(|e| self.inner.fail(0, "read two-factor state", e.into()))?;
        Ok(row.map(|r| TwoFactor {
            secret: r.get(0),
            enabled: r.get(1),
            last_step: r.get(2),
            recovery_codes: u32::try_from(r.get::<_, i64>(3)).unwrap_or(u32::MAX),
        }))
    }

    async fn begin_two_factor(&self, user_id: i64, secret: Vec<u8>) -> Result<bool> {
        let c = self.inner.conn(0).await?;
        let n = c
            .execute(
                "INSERT INTO two_factor (user_id, secret, enabled, last_step, created_at)
                 VALUES ($1, $2, false, 0, $3)
                 ON CONFLICT (user_id) DO UPDATE SET secret = $2, created_at = $3
                 WHERE NOT two_factor.enabled",
                &[&user_id, &secret, &now_ms()],
            )
            .await
            .map_err(|e| self.inner.fail(0, "begin two-factor enrolment", e.into()))?;
        Ok(n == 1)
    }

    async fn enable_two_factor(
        &self,
        user_id: i64,
        secret: Vec<u8>,
        step: i64,
        recovery_codes: Vec<TokenHash>,
    ) -> Result<bool> {
        let mut c = self.inner.conn(0).await?;
        let result: std::result::Result<bool, Fail> = async {
            let tx = c.transaction().await?;
            let n = tx
                .execute(
                    "UPDATE two_factor SET enabled = true, last_step = $3
                     WHERE user_id = $1 AND secret = $2 AND NOT enabled",
                    &[&user_id, &secret, &step],
                )
                .await?;
            if n == 1 {
                put_recovery_codes(&tx, user_id, &recovery_codes).await?;
            }
            tx.commit().await?;
            Ok(n == 1)
        }
        .await;
        result.map_err(|e| self.inner.fail(0, "enable two-factor login", e))
    }

    async fn use_code_step(&self, user_id: i64, step: i64) -> Result<bool> {
        let c = self.inner.conn(0).await?;
        let n = c
            .execute(
                "UPDATE two_factor SET last_step = $2
                 WHERE user_id = $1 AND enabled AND last_step < $2",
                &[&user_id, &step],
            )
            .await
            .map_err(|e| self.inner.fail(0, "use a two-factor code", e.into()))?;
        Ok(n == 1)
    }

    async fn use_recovery_code(&self, user_id: i64, code: TokenHash) -> Result<bool> {
        let c = self.inner.conn(0).await?;
        let n = c
            .execute(
                "DELETE FROM recovery_codes WHERE user_id = $1 AND code_hash = $2
                 AND EXISTS (SELECT 1 FROM two_factor WHERE user_id = $1 AND enabled)",
                &[&user_id, &&code[..]],
            )
            .await
            .map_err(|e| self.inner.fail(0, "use a recovery code", e.into()))?;
        Ok(n == 1)
    }

    async fn replace_recovery_codes(&self, user_id: i64, codes: Vec<TokenHash>) -> Result<bool> {
        let mut c = self.inner.conn(0).await?;
        let result: std::result::Result<bool, Fail> = async {
            let tx = c.transaction().await?;
            let on = tx
                .query_opt(
                    "SELECT 1 FROM two_factor WHERE user_id = $1 AND enabled FOR UPDATE",
                    &[&user_id],
                )
                .await?
                .is_some();
            if on {
                put_recovery_codes(&tx, user_id, &codes).await?;
            }
            tx.commit().await?;
            Ok(on)
        }
        .await;
        result.map_err(|e| self.inner.fail(0, "replace recovery codes", e))
    }

    async fn disable_two_factor(&self, user_id: i64) -> Result<()> {
        let mut c = self.inner.conn(0).await?;
        let result: std::result::Result<(), Fail> = async {
            let tx = c.transaction().await?;
            tx.execute("DELETE FROM two_factor WHERE user_id = $1", &[&user_id])
                .await?;
            tx.execute("DELETE FROM recovery_codes WHERE user_id = $1", &[&user_id])
                .await?;
            tx.commit().await?;
            Ok(())
        }
        .await;
        result.map_err(|e| self.inner.fail(0, "disable two-factor login", e))
    }

    async fn delete_account(&self, user_id: i64) -> Result<DeletedAccount> {
        let now = now_ms();
        let mut c = self.inner.conn(0).await?;
        let result: std::result::Result<DeletedAccount, Fail> = async {
            let tx = c.transaction().await?;
            let live = tx
                .execute(
                    "SELECT 1 FROM users WHERE id = $1 AND deleted_at IS NULL FOR UPDATE",
                    &[&user_id],
                )
                .await?;
            if live == 0 {
                return Err(Fail::Store(StoreError::NotFound));
            }
            let mut users = vec![user_id];
            for row in tx
                .query(
                    "SELECT id FROM users WHERE bot_owner = $1 AND deleted_at IS NULL FOR UPDATE",
                    &[&user_id],
                )
                .await?
            {
                users.push(row.get(0));
            }
            tx.execute(
                "UPDATE users SET deleted_at = $2, username = 'deleted', display_name = NULL,
                     about = NULL, last_seen_at = NULL, password_hash = ''
                 WHERE id = ANY($1)",
                &[&users, &now],
            )
            .await?;
            let mut tokens = Vec::new();
            for row in tx
                .query(
                    "DELETE FROM sessions WHERE user_id = ANY($1) RETURNING user_id, token_hash",
                    &[&users],
                )
                .await?
            {
                tokens.extend(digest(row.get(1)).map(|t| (row.get::<_, i64>(0), t)));
            }
            for row in tx
                .query(
                    "DELETE FROM api_keys WHERE owner_id = ANY($1) OR user_id = ANY($1)
                     RETURNING user_id, token_hash",
                    &[&users],
                )
                .await?
            {
                tokens.extend(digest(row.get(1)).map(|t| (row.get::<_, i64>(0), t)));
            }
            tx.execute("DELETE FROM two_factor WHERE user_id = ANY($1)", &[&users])
                .await?;
            tx.execute(
                "DELETE FROM recovery_codes WHERE user_id = ANY($1)",
                &[&users],
            )
            .await?;
            tx.commit().await?;
            Ok(DeletedAccount { users, tokens })
        }
        .await;
        result.map_err(|e| self.inner.fail(0, "delete an account", e))
    }

    async fn depart(&self, user_id: i64, channel_id: i64, leaving: &[i64]) -> Result<bool> {
        let inner = &self.inner;
        let shard = inner.shard_of_channel(channel_id);
        let done = inner
            .submit(
                shard,
                Op::Depart {
                    user_id,
                    channel_id,
                    leaving: leaving.to_vec(),
                },
            )
            .await?;
        inner.relay_now(shard).await;
        match done {
            Done::Changed(changed) => Ok(changed),
            _ => Err(StoreError::internal(
                "depart",
                "the writer answered with something else",
            )),
        }
    }

    async fn departed(&self, users: &[i64]) -> Result<()> {
        let c = self.inner.conn(0).await?;
        c.execute(
            "UPDATE users SET departed_at = $2 WHERE id = ANY($1) AND deleted_at IS NOT NULL",
            &[&users, &now_ms()],
        )
        .await
        .map_err(|e| self.inner.fail(0, "record departures", e.into()))?;
        Ok(())
    }

    async fn departing(&self) -> Result<Vec<i64>> {
        let c = self.inner.conn(0).await?;
        let rows = c
            .query(
                "SELECT id FROM users WHERE deleted_at IS NOT NULL AND departed_at IS NULL",
                &[],
            )
            .await
            .map_err(|e| self.inner.fail(0, "read departing accounts", e.into()))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn change_password(
        &self,
        user_id: i64,
        password_hash: &str,
        keep: TokenHash,
    ) -> Result<Vec<TokenHash>> {
        let mut c = self.inner.conn(0).await?;
        let result: std::result::Result<Vec<TokenHash>, Fail> = async {
            let tx = c.transaction().await?;
            let n = tx
                .execute(
                    "UPDATE users SET password_hash = $2 WHERE id = $1",
                    &[&user_id, &password_hash],
                )
                .await?;
            if n == 0 {
                return Err(Fail::Store(StoreError::NotFound));
            }
            let ended = tx
                .query(
                    "DELETE FROM sessions WHERE user_id = $1 AND token_hash != $2
                     RETURNING token_hash",
                    &[&user_id, &&keep[..]],
                )
                .await?;
            tx.commit().await?;
            Ok(ended.iter().filter_map(|r| digest(r.get(0))).collect())
        }
        .await;
        result.map_err(|e| self.inner.fail(0, "change password", e))
    }
}

async fn put_recovery_codes(
    tx: &tokio_postgres::Transaction<'_>,
    user_id: i64,
    codes: &[TokenHash],
) -> std::result::Result<(), tokio_postgres::Error> {
    tx.execute("DELETE FROM recovery_codes WHERE user_id = $1", &[&user_id])
        .await?;
    let codes: Vec<&[u8]> = codes.iter().map(|c| &c[..]).collect();
    tx.execute(
        "INSERT INTO recovery_codes (user_id, code_hash)
         SELECT $1, c FROM unnest($2::BYTEA[]) AS c ON CONFLICT DO NOTHING",
        &[&user_id, &codes],
    )
    .await?;
    Ok(())
}
