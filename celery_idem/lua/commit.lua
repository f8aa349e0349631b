-- commit: record the outcome of a run, only if the caller still holds the lease.
--
-- KEYS[1]  the record
-- KEYS[2]  its steps (deleted: duplicates get the outcome, no step runs again)
-- KEYS[3]  the counters of its shard
-- ARGV[1]  the caller's fencing token
-- ARGV[2]  'done' (a result) or 'failed' (a failure to replay to duplicates)
-- ARGV[3]  the encoded outcome
-- ARGV[4]  its content type
-- ARGV[5]  its content encoding
-- ARGV[6]  how long to keep the record, ms
-- ARGV[7]  the task's name, for the counters ('' counts nothing)
-- ARGV[8]  steps this run replayed, ARGV[9] transactions it ran, ARGV[10] transactions
--          it replayed, ARGV[11] backend errors its earlier commit attempts met (counted)
--
-- Returns {1} when recorded (also when this token already recorded it: a commit
-- retried after a lost reply must not fail, nor count twice), else {0, state, token}
-- describing the record the caller lost to ('missing' when the record expired).
local key, task = KEYS[1], ARGV[7]
local rec = redis.call('HMGET', key, 'state', 'token', 'losttok')

local function count(name, n)
  if task ~= '' and n > 0 then
    redis.call('HINCRBY', KEYS[3], task .. '\31' .. name, n)
  end
end

if rec[2] == ARGV[1] then
  if rec[1] == 'running' then
    redis.call('HSET', key, 'state', ARGV[2], 'result', ARGV[3], 'ctype', ARGV[4], 'cenc', ARGV[5])
    redis.call('HDEL', key, 'expires')
    redis.call('PEXPIRE', key, tonumber(ARGV[6]))
    redis.call('DEL', KEYS[2])
    count(ARGV[2] == 'done' and 'succeeded' or 'failures_recorded', 1)
    count('steps_replayed', tonumber(ARGV[8]))
    count('transactions_run', tonumber(ARGV[9]))
    count('transactions_replayed', tonumber(ARGV[10]))
    count('backend_errors', tonumber(ARGV[11]))
    return {1}
  end
  if rec[1] == 'done' or rec[1] == 'failed' then
    return {1}
  end
end
if rec[1] and rec[3] ~= ARGV[1] then
  redis.call('HSET', key, 'losttok', ARGV[1])
  count('leases_lost', 1)
elseif not rec[1] then
  count('leases_lost', 1)
end
return {0, rec[1] or 'missing', tonumber(rec[2]) or 0}
