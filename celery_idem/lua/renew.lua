-- renew: extend a lease the caller still holds.
--
-- KEYS[1]  the record
-- KEYS[2]  its steps (their TTL follows the record's)
-- ARGV[1]  the caller's fencing token
-- ARGV[2]  lease length, ms
-- ARGV[3]  how long a finished record is kept, ms
--
-- Returns 1 when renewed, 0 when the caller no longer holds the lease (another run
-- took it over, or it was released or finished).
local key = KEYS[1]
local rec = redis.call('HMGET', key, 'state', 'token')
if rec[1] ~= 'running' or rec[2] ~= ARGV[1] then
  return 0
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('HSET', key, 'expires', now + lease)
redis.call('PEXPIRE', key, lease + tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[2], lease + tonumber(ARGV[3]))
return 1
