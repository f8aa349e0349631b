-- step: store the value of one step of a run, only while the caller holds the lease.
--
-- KEYS[1]  the record
-- KEYS[2]  its steps: step name -> stored value
-- KEYS[3]  the counters of its shard
-- ARGV[1]  the caller's fencing token
-- ARGV[2]  the step's name
-- ARGV[3]  the stored value (encoded by the caller)
-- ARGV[4]  the task's name, for the counters ('' counts nothing)
--
-- The steps hash lives as long as the record (its TTL is set to the record's).
-- Returns 1 when stored (also when this step already holds a value: the caller then
-- keeps the first one, as a repeated call after a lost reply must; counted once),
-- else {0, state, token} describing the record the caller lost to.
local rec = redis.call('HMGET', KEYS[1], 'state', 'token', 'losttok')
if rec[1] ~= 'running' or rec[2] ~= ARGV[1] then
  if rec[1] and rec[2] ~= ARGV[1] and rec[3] ~= ARGV[1] then
    redis.call('HSET', KEYS[1], 'losttok', ARGV[1])
    if ARGV[4] ~= '' then
      redis.call('HINCRBY', KEYS[3], ARGV[4] .. '\31leases_lost', 1)
    end
  end
  return {0, rec[1] or 'missing', tonumber(rec[2]) or 0}
end
if redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3]) == 1 and ARGV[4] ~= '' then
  redis.call('HINCRBY', KEYS[3], ARGV[4] .. '\31steps_run', 1)
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return 1
