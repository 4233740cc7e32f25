#include "block_manager.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace {

uint64_t mix(uint64_t h, uint64_t v) {  // splitmix64-style combine: cheap and well spread
  h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
  h ^= h >> 31;
  h *= 0xbf58476d1ce4e5b9ULL;
  h ^= h >> 29;
  return h;
}

}  // namespace

BlockManager::BlockManager(int32_t num_blocks, int32_t block_size, bool prefix_caching)
    : block_size_(block_size), prefix_caching_(prefix_caching), blocks_(num_blocks) {
  if (num_blocks <= 0 || block_size <= 0)
    throw std::invalid_argument("num_blocks and block_size must be positive, got " + std::to_string(num_blocks) +
                                " and " + std::to_string(block_size));
  free_.reserve(num_blocks);
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
}

uint64_t BlockManager::chain_hash(uint64_t parent, const int32_t* tokens) const {
  uint64_t h = mix(parent, 0x1234567ULL);
  for (int32_t i = 0; i < block_size_; ++i) h = mix(h, static_cast<uint32_t>(tokens[i]));
  return h;
}

BlockManager::Seq& BlockManager::seq(int64_t id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) throw std::out_of_range("unknown sequence " + std::to_string(id));
  return it->second;
}

const BlockManager::Seq& BlockManager::seq(int64_t id) const {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) throw std::out_of_range("unknown sequence " + std::to_string(id));
  return it->second;
}

int32_t BlockManager::take_block() {
  int32_t b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else if (!lru_.empty()) {  // evict the least recently used cached block
    b = lru_.front();
    lru_.pop_front();
    cache_.erase(blocks_[b].hash);
  } else {
    throw std::runtime_error("out of KV blocks");
  }
  Block& blk = blocks_[b];
  blk.refs = 1;
  blk.hashed = false;
  blk.tokens.clear();
  return b;
}

void BlockManager::release(int32_t b) {
  Block& blk = blocks_[b];
  if (--blk.refs > 0) return;
  if (blk.hashed) {
    blk.lru_pos = lru_.insert(lru_.end(), b);
  } else {
    free_.push_back(b);
  }
}

void BlockManager::seal(Seq& s, size_t index) {
  if (!prefix_caching_) return;
  Block& blk = blocks_[s.table[index]];
  if (blk.hashed) return;
  const uint64_t parent = index == 0 ? 0 : blocks_[s.table[index - 1]].hash;
  if (index > 0 && !blocks_[s.table[index - 1]].hashed) return;  // the chain is broken above this block
  const int32_t* toks = s.tokens.data() + index * block_size_;
  const uint64_t h = chain_hash(parent, toks);
  if (cache_.count(h)) return;  // an identical block is cached already; keep this one private
  blk.hashed = true;
  blk.hash = h;
  blk.tokens.assign(toks, toks + block_size_);
  cache_[h] = s.table[index];
}

bool BlockManager::can_allocate(const std::vector<int32_t>& tokens) const {
  const int64_t needed = (static_cast<int64_t>(tokens.size()) + block_size_ - 1) / block_size_;
  return needed <= num_free();
}

int64_t BlockManager::allocate(int64_t id, const std::vector<int32_t>& tokens) {
  if (seqs_.count(id)) throw std::invalid_argument("sequence " + std::to_string(id) + " already has blocks");
  if (tokens.empty()) throw std::invalid_argument("cannot allocate an empty sequence");
  if (!can_allocate(tokens)) throw std::runtime_error("out of KV blocks");
  Seq s;
  s.tokens = tokens;
  const size_t n = tokens.size();  // blocks are sealed into the cache by mark_computed, once their KV exists
  // The last prompt token is always recomputed (its logits start the generation), so at most
  // (n - 1) / block_size blocks can come from the cache.
  const size_t reusable = prefix_caching_ ? (n - 1) / block_size_ : 0;
  uint64_t parent = 0;
  size_t hits = 0;
  for (; hits < reusable; ++hits) {
    const int32_t* toks = tokens.data() + hits * block_size_;
    const uint64_t h = chain_hash(parent, toks);
    auto it = cache_.find(h);
    if (it == cache_.end()) break;
    Block& blk = blocks_[it->second];
    if (!std::equal(toks, toks + block_size_, blk.tokens.begin())) break;  // a hash collision
    if (blk.refs == 0) lru_.erase(blk.lru_pos);
    ++blk.refs;
    s.table.push_back(it->second);
    parent = h;
  }
  queried_tokens_ += static_cast<int64_t>(reusable * block_size_);
  hit_tokens_ += static_cast<int64_t>(hits * block_size_);
  const size_t needed = (n + block_size_ - 1) / block_size_;
  while (s.table.size() < needed) s.table.push_back(take_block());
  seqs_[id] = std::move(s);
  return static_cast<int64_t>(hits * block_size_);
}

bool BlockManager::can_append(int64_t id) const {
  const Seq& s = seq(id);
  return s.tokens.size() % block_size_ != 0 || num_free() > 0;
}

int64_t BlockManager::append(int64_t id, int32_t token) {
  Seq& s = seq(id);
  const size_t pos = s.tokens.size();
  // fork() copies a partial last block, so a block being written into is never shared
  if (pos % block_size_ == 0) s.table.push_back(take_block());
  s.tokens.push_back(token);
  return slot(id, static_cast<int64_t>(pos));
}

std::vector<BlockManager::Copy> BlockManager::fork(int64_t parent, int64_t child) {
  if (seqs_.count(child)) throw std::invalid_argument("sequence " + std::to_string(child) + " already has blocks");
  const Seq& p = seq(parent);
  Seq c = p;
  std::vector<Copy> copies;
  const bool partial = p.tokens.size() % block_size_ != 0;
  const size_t shared = partial ? c.table.size() - 1 : c.table.size();
  if (partial && num_free() == 0) throw std::runtime_error("out of KV blocks");
  for (size_t i = 0; i < shared; ++i) ++blocks_[c.table[i]].refs;
  if (partial) {
    const int32_t dst = take_block();
    copies.emplace_back(c.table.back(), dst);
    c.table.back() = dst;
  }
  seqs_[child] = std::move(c);
  return copies;
}

void BlockManager::mark_computed(int64_t id, int64_t n) {
  Seq& s = seq(id);
  const int64_t full = std::min<int64_t>(n, static_cast<int64_t>(s.tokens.size())) / block_size_;
  for (int64_t i = 0; i < full; ++i) seal(s, static_cast<size_t>(i));
}

void BlockManager::free(int64_t id) {
  Seq& s = seq(id);
  // Release from the end so that a sequence's deeper blocks are evicted before its shared prefix.
  for (auto it = s.table.rbegin(); it != s.table.rend(); ++it) release(*it);
  seqs_.erase(id);
}

void BlockManager::reset_prefix_cache() {
  for (int32_t b : lru_) {
    blocks_[b].hashed = false;
    free_.push_back(b);
  }
  lru_.clear();
  for (auto& blk : blocks_) blk.hashed = false;
  cache_.clear();
}

const std::vector<int32_t>& BlockManager::block_table(int64_t id) const { return seq(id).table; }

int64_t BlockManager::num_tokens(int64_t id) const { return static_cast<int64_t>(seq(id).tokens.size()); }

int64_t BlockManager::slot(int64_t id, int64_t position) const {
  const Seq& s = seq(id);
  if (position < 0 || position / block_size_ >= static_cast<int64_t>(s.table.size()))
    throw std::out_of_range("position " + std::to_string(position) + " has no block in sequence " +
                            std::to_string(id));
  return static_cast<int64_t>(s.table[position / block_size_]) * block_size_ + position % block_size_;
}
