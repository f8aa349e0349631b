-- commit: record the outcome of a run, only if the caller still holds the lease.
--
-- KEYS[1]  the record
-- KEYS[2]  its steps (deleted: duplicates get the outcome, no step runs again)
-- ARGV[1]  the caller's fencing token
-- ARGV[2]  'done' (a result) or 'failed' (a failure to replay to duplicates)
-- ARGV[3]  the encoded outcome
-- ARGV[4]  its content type
-- ARGV[5]  its content encoding
-- ARGV[6]  how long to keep the record, ms
--
-- Returns {1} when recorded (also when this token already recorded it: a commit
-- retried after a lost reply must not fail), else {0, state, token} describing the
-- record the caller lost to ('missing' when the record expired).
local key = KEYS[1]
local rec = redis.call('HMGET', key, 'state', 'token')
if rec[2] == ARGV[1] then
  if rec[1] == 'running' then
    redis.call('HSET', key, 'state', ARGV[2], 'result', ARGV[3], 'ctype', ARGV[4], 'cenc', ARGV[5])
    redis.call('HDEL', key, 'expires')
    redis.call('PEXPIRE', key, tonumber(ARGV[6]))
    redis.call('DEL', KEYS[2])
    return {1}
  end
  if rec[1] == 'done' or rec[1] == 'failed' then
    return {1}
  end
end
return {0, rec[1] or 'missing', tonumber(rec[2]) or 0}
